//! A read-only FUSE file system serving one version straight from the store.
//!
//! Directories are listed from the version's trees, attributes come from
//! tree entries, and reads decode only the chunks they touch (through a
//! bounded cache of decompressed chunks shared by every reader). Nothing is
//! materialized. Writes fail with `EROFS`; the kernel may keep file pages
//! cached across opens because a version never changes.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dsv_store::{ChunkId, Entry, EntryTarget, FileObject};
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
    SessionACL,
};

use crate::error::{Error, Result};
use crate::repo::{DatasetVersion, Repo};

const TTL: Duration = Duration::from_secs(3600);
const BLOCK: u32 = 4096;
/// Bytes of a file fetched ahead when a read finds its chunk on a remote.
const READ_AHEAD: u64 = 8 << 20;

/// Mount settings.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Bytes of decompressed chunks kept in memory.
    pub chunk_cache_bytes: usize,
    /// Request-serving threads.
    pub threads: usize,
    /// Let other users read the mount (needs `user_allow_other` in
    /// `/etc/fuse.conf` unless root).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            chunk_cache_bytes: 128 << 20,
            threads: 4,
            allow_other: false,
        }
    }
}

struct Node {
    parent: u64,
    entry: Entry,
}

struct OpenFile {
    fo: FileObject,
    /// Start offset of each chunk.
    starts: Vec<u64>,
}

/// Decoded chunks by id, their insertion order, and their bytes.
type ChunkMap = (HashMap<ChunkId, Arc<Vec<u8>>>, VecDeque<ChunkId>, usize);

/// A directory's children: (name, inode) sorted by name.
type Children = Arc<Vec<(Vec<u8>, u64)>>;

/// What `readdir` and `readdirplus` list: ".", "..", then the children.
struct Listing {
    kids: Children,
    parent: u64,
}

impl Listing {
    /// Entry `i` of the listing of directory `ino`: (inode, name).
    fn slot(&self, ino: u64, i: usize) -> Option<(u64, &OsStr)> {
        match i {
            0 => Some((ino, OsStr::new("."))),
            1 => Some((self.parent, OsStr::new(".."))),
            _ => self
                .kids
                .get(i - 2)
                .map(|(name, child)| (*child, OsStr::from_bytes(name))),
        }
    }
}

struct ChunkCache {
    max: usize,
    inner: Mutex<ChunkMap>,
}

impl ChunkCache {
    fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.inner.lock().ok()?.0.get(id).cloned()
    }
    fn put(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        let Ok(mut g) = self.inner.lock() else { return };
        let (map, order, bytes) = &mut *g;
        if map.contains_key(&id) {
            return;
        }
        *bytes += data.len();
        map.insert(id, data);
        order.push_back(id);
        while *bytes > self.max {
            let Some(old) = order.pop_front() else { break };
            if let Some(d) = map.remove(&old) {
                *bytes -= d.len();
            }
        }
    }
}

/// The file system of one version.
pub struct VersionFs {
    repo: Arc<Repo>,
    root_size: u64,
    file_count: u64,
    created: SystemTime,
    uid: u32,
    gid: u32,
    nodes: RwLock<Vec<Node>>,
    children: RwLock<HashMap<u64, Children>>,
    open: RwLock<HashMap<u64, Arc<OpenFile>>>,
    chunks: ChunkCache,
    on_destroy: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The kernel agreed to skip `open`/`release` (and the directory
    /// equivalents) once we answer ENOSYS: files then keep their page
    /// cache (`FOPEN_KEEP_CACHE`) and directories their listing
    /// (`FOPEN_CACHE_DIR`), the kernel's defaults without an open.
    no_open: bool,
    no_opendir: bool,
}

/// Every store failure reaches the reader as an I/O error (a damaged chunk
/// never returns wrong bytes: reads verify each chunk's hash).
fn err_of(_e: &dyn std::fmt::Display) -> Errno {
    Errno::EIO
}

impl VersionFs {
    /// A file system for `v`.
    pub fn new(repo: Arc<Repo>, v: &DatasetVersion, opts: &MountOptions) -> Result<VersionFs> {
        let root_tree = repo.store().version(&v.id)?.object.root;
        let created = UNIX_EPOCH + Duration::from_millis(v.created_ms.max(0) as u64);
        // The mounting process's ids, read from /proc (no unsafe libc calls).
        let (uid, gid) = current_ids();
        let root = Node {
            parent: 1,
            entry: Entry {
                name: Vec::new(),
                mode: 0o755,
                size: v.total_bytes,
                target: EntryTarget::Dir {
                    id: root_tree,
                    file_count: v.file_count,
                },
            },
        };
        Ok(VersionFs {
            repo,
            root_size: v.total_bytes,
            file_count: v.file_count,
            created,
            uid,
            gid,
            // Inode 0 is unused; 1 is the root.
            nodes: RwLock::new(vec![
                Node {
                    parent: 1,
                    entry: root.entry.clone(),
                },
                root,
            ]),
            children: RwLock::new(HashMap::new()),
            open: RwLock::new(HashMap::new()),
            chunks: ChunkCache {
                max: opts.chunk_cache_bytes,
                inner: Mutex::new((HashMap::new(), VecDeque::new(), 0)),
            },
            on_destroy: Mutex::new(None),
            no_open: false,
            no_opendir: false,
        })
    }

    /// Called once when the kernel ends the session (unmounted, by us or
    /// by `fusermount -u`).
    pub fn on_destroy(&self, f: Box<dyn FnOnce() + Send>) {
        if let Ok(mut g) = self.on_destroy.lock() {
            *g = Some(f);
        }
    }

    fn attr(&self, ino: u64, e: &Entry) -> FileAttr {
        let (kind, perm, size, nlink) = match &e.target {
            EntryTarget::Dir { .. } => (FileType::Directory, 0o555, 0, 2),
            EntryTarget::File(_) => (
                FileType::RegularFile,
                (e.mode & 0o555) as u16 | 0o444,
                e.size,
                1,
            ),
            EntryTarget::Symlink(t) => (FileType::Symlink, 0o777, t.len() as u64, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: BLOCK,
        }
    }

    fn node_entry(&self, ino: u64) -> Option<Entry> {
        let nodes = self.nodes.read().ok()?;
        if ino == 0 {
            return None;
        }
        nodes.get(ino as usize).map(|n| n.entry.clone())
    }

    fn children(&self, ino: u64) -> std::result::Result<Children, Errno> {
        if let Some(c) = self.children.read().map_err(|_| Errno::EIO)?.get(&ino) {
            return Ok(c.clone());
        }
        let entry = self.node_entry(ino).ok_or(Errno::ENOENT)?;
        let EntryTarget::Dir { id, .. } = entry.target else {
            return Err(Errno::ENOTDIR);
        };
        let list = self.repo.store().list_dir(&id).map_err(|e| err_of(&e))?;
        let mut children = self.children.write().map_err(|_| Errno::EIO)?;
        if let Some(c) = children.get(&ino) {
            return Ok(c.clone());
        }
        let mut nodes = self.nodes.write().map_err(|_| Errno::EIO)?;
        let mut out = Vec::with_capacity(list.len());
        for e in list {
            let child = nodes.len() as u64;
            out.push((e.name.clone(), child));
            nodes.push(Node {
                parent: ino,
                entry: e,
            });
        }
        let out = Arc::new(out);
        children.insert(ino, out.clone());
        Ok(out)
    }

    /// A directory's children and its parent, for listing.
    fn listing(&self, ino: u64) -> std::result::Result<Listing, Errno> {
        let kids = self.children(ino)?;
        let parent = self
            .nodes
            .read()
            .ok()
            .and_then(|n| n.get(ino as usize).map(|n| n.parent))
            .unwrap_or(1);
        Ok(Listing { kids, parent })
    }

    fn open_file(&self, ino: u64) -> std::result::Result<Arc<OpenFile>, Errno> {
        if let Some(f) = self.open.read().map_err(|_| Errno::EIO)?.get(&ino) {
            return Ok(f.clone());
        }
        let entry = self.node_entry(ino).ok_or(Errno::ENOENT)?;
        let EntryTarget::File(id) = entry.target else {
            return Err(Errno::EISDIR);
        };
        let fo = self.repo.store().file_object(&id).map_err(|e| err_of(&e))?;
        let mut starts = Vec::with_capacity(fo.chunks.len());
        let mut at = 0u64;
        for (_, l) in &fo.chunks {
            starts.push(at);
            at += *l as u64;
        }
        let f = Arc::new(OpenFile { fo, starts });
        self.open
            .write()
            .map_err(|_| Errno::EIO)?
            .insert(ino, f.clone());
        Ok(f)
    }

    fn chunk(&self, id: &ChunkId) -> std::result::Result<Arc<Vec<u8>>, Errno> {
        if let Some(d) = self.chunks.get(id) {
            return Ok(d);
        }
        let d = Arc::new(self.repo.store().read_chunk(id).map_err(|e| err_of(&e))?);
        self.chunks.put(*id, d.clone());
        Ok(d)
    }

    fn read_range(
        &self,
        f: &OpenFile,
        offset: u64,
        size: u32,
    ) -> std::result::Result<Vec<u8>, Errno> {
        let end = offset.saturating_add(size as u64).min(f.fo.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut i = match f.starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        // A chunk that is neither in memory nor stored here (a lazy clone,
        // another machine's pack of a team repository):
        // fetch it and the next READ_AHEAD bytes of the file in one batch
        // rather than one request per chunk.
        let first = &f.fo.chunks[i].0;
        if self.chunks.get(first).is_none()
            && !self
                .repo
                .store()
                .has_local_chunk(first)
                .map_err(|e| err_of(&e))?
        {
            let ahead = end.max(offset.saturating_add(READ_AHEAD));
            let ids: Vec<ChunkId> = (i..f.fo.chunks.len())
                .take_while(|&k| f.starts[k] < ahead)
                .map(|k| f.fo.chunks[k].0)
                .collect();
            self.repo
                .store()
                .prefetch_missing(&ids)
                .map_err(|e| err_of(&e))?;
        }
        while i < f.fo.chunks.len() && f.starts[i] < end {
            let data = self.chunk(&f.fo.chunks[i].0)?;
            let s = f.starts[i];
            let from = offset.saturating_sub(s) as usize;
            let to = ((end - s) as usize).min(data.len());
            out.extend_from_slice(&data[from..to]);
            i += 1;
        }
        Ok(out)
    }
}

fn current_ids() -> (u32, u32) {
    let m = std::fs::metadata("/proc/self");
    #[allow(clippy::unnecessary_lazy_evaluations)]
    m.map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.uid(), m.gid())
    })
    .unwrap_or((0, 0))
}

fn kind_of(e: &Entry) -> FileType {
    match e.target {
        EntryTarget::Dir { .. } => FileType::Directory,
        EntryTarget::File(_) => FileType::RegularFile,
        EntryTarget::Symlink(_) => FileType::Symlink,
    }
}

impl Filesystem for VersionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        // Versions never change: a read-only open needs no round trip.
        self.no_open = config
            .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
            .is_ok();
        self.no_opendir = config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        // Listings carry attributes: `ls -l`, `find` then `cat` need no
        // lookup per name.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(f) = self.on_destroy.lock().ok().and_then(|mut g| g.take()) {
            f();
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let kids = match self.children(parent.0) {
            Ok(k) => k,
            Err(e) => return reply.error(e),
        };
        let name = name.as_bytes();
        match kids.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
            Ok(i) => {
                let ino = kids[i].1;
                match self.node_entry(ino) {
                    Some(e) => reply.entry(&TTL, &self.attr(ino, &e), Generation(0)),
                    None => reply.error(Errno::ENOENT),
                }
            }
            Err(_) => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node_entry(ino.0) {
            Some(e) => reply.attr(&TTL, &self.attr(ino.0, &e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node_entry(ino.0).map(|e| e.target) {
            Some(EntryTarget::Symlink(t)) => reply.data(&t),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match self.open_file(ino.0) {
            Ok(_) if self.no_open => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.open_file(ino.0) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match self.read_range(&f, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.children(ino.0) {
            Ok(_) if self.no_opendir => reply.error(Errno::ENOSYS),
            Ok(_) => reply.opened(FileHandle(ino.0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listing = match self.listing(ino.0) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let mut i = offset as usize;
        while let Some((child, name)) = listing.slot(ino.0, i) {
            let kind = self
                .node_entry(child)
                .map(|e| kind_of(&e))
                .unwrap_or(FileType::RegularFile);
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let listing = match self.listing(ino.0) {
            Ok(l) => l,
            Err(e) => return reply.error(e),
        };
        let mut i = offset as usize;
        while let Some((child, name)) = listing.slot(ino.0, i) {
            let Some(e) = self.node_entry(child) else {
                return reply.error(Errno::EIO);
            };
            let attr = self.attr(child, &e);
            if reply.add(
                INodeNo(child),
                i as u64 + 1,
                name,
                &TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.root_size.div_ceil(BLOCK as u64);
        reply.statfs(blocks, 0, 0, self.file_count, 0, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if self.node_entry(ino.0).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}

/// A mounted version; unmounts when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
}

impl Mounted {
    /// Unmounts and waits for the serving threads.
    pub fn unmount(mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            s.umount_and_join().map_err(|e| Error::Io {
                action: "unmount".into(),
                path: Default::default(),
                source: e,
            })?;
        }
        Ok(())
    }

    /// Waits for the serving threads after the kernel ended the session.
    pub fn join(mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.join();
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// Checks a mount point: an existing, empty folder.
pub fn check_mountpoint(mountpoint: &Path) -> Result<()> {
    let m = std::fs::metadata(mountpoint).map_err(|e| Error::Io {
        action: "mount on".into(),
        path: mountpoint.to_path_buf(),
        source: e,
    })?;
    if !m.is_dir() {
        return Err(Error::Invalid(format!(
            "cannot mount on {}: not a folder",
            mountpoint.display()
        )));
    }
    let mut rd = std::fs::read_dir(mountpoint).map_err(|e| Error::Io {
        action: "list".into(),
        path: mountpoint.to_path_buf(),
        source: e,
    })?;
    if rd.next().is_some() {
        return Err(Error::Invalid(format!(
            "cannot mount on {}: the folder is not empty",
            mountpoint.display()
        )));
    }
    Ok(())
}

/// Mounts `v` read-only at `mountpoint` (an empty folder) and serves it
/// from background threads until the returned handle is dropped or
/// [`Mounted::unmount`] is called. `on_end` runs when the kernel ends the
/// session (including an external `fusermount -u`).
pub fn mount(
    repo: Arc<Repo>,
    v: &DatasetVersion,
    mountpoint: &Path,
    opts: &MountOptions,
    on_end: Box<dyn FnOnce() + Send>,
) -> Result<Mounted> {
    check_mountpoint(mountpoint)?;
    let fs = VersionFs::new(repo, v, opts)?;
    fs.on_destroy(on_end);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("dsv:{}", v.id.to_hex())),
        MountOption::Subtype("dsv".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|e| Error::Io {
        action: "mount (is FUSE available: /dev/fuse and fusermount3?) on".into(),
        path: mountpoint.to_path_buf(),
        source: e,
    })?;
    Ok(Mounted {
        session: Some(session),
    })
}
