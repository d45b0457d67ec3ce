//! The pack-storage seam: where immutable packs and the few small mutable
//! documents of a remote live.
//!
//! A [`PackStorage`] is a flat namespace of named objects with the
//! operations object stores share: a write that only creates
//! ([`PutMode::Create`], S3's `If-None-Match: *`), a write that only
//! replaces what was read ([`PutMode::Update`], `If-Match: ETAG`), whole
//! and ranged reads, listing by prefix and deletion. Packs are written once
//! under their content hash, so a repeated upload of the same name is
//! harmless; refs are the only objects ever updated, always conditionally,
//! so two writers never lose each other's work.
//!
//! This crate implements it for a local folder ([`LocalDir`]); `dsv-remote`
//! implements it on object storage (S3 and S3-compatible servers, GCS,
//! Azure) through the `object_store` crate. Batch calls
//! ([`PackStorage::put_many`], [`PackStorage::get_ranges`]) let an
//! implementation run requests concurrently on its own I/O runtime instead
//! of blocking a compute pool.
//!
//! [`ChunkSource`] is the read side of a lazy clone: a store whose chunk
//! index lacks a chunk asks its source (a remote) for the stored bytes and
//! checks them against the chunk id before using them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::kv::KvRead;

/// How a write treats an existing object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Write only if no object has the name.
    Create,
    /// Replace only the object whose entity tag is this one.
    Update(String),
    /// Write unconditionally.
    Overwrite,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written; the new entity tag when the storage reports one.
    Written(Option<String>),
    /// [`PutMode::Create`] found an object with the name; nothing written.
    Exists,
    /// [`PutMode::Update`] found another version of the object (or none);
    /// nothing written.
    Changed,
}

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its name (relative to the storage's root).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, ms since the epoch, by the storage's clock
    /// (S3's `Last-Modified`, a file's mtime).
    pub modified_ms: i64,
}

/// A whole-object read: the bytes and the entity tag to update it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    /// The object's bytes.
    pub data: Vec<u8>,
    /// Its entity tag.
    pub etag: Option<String>,
}

/// Progress of a batch transfer: called with bytes moved since the last call.
pub type OnBytes<'a> = &'a (dyn Fn(u64) + Sync);

/// The pack-storage seam (see the module documentation).
pub trait PackStorage: Send + Sync + std::fmt::Debug {
    /// Where it is (a URL or a path), for messages. Never holds secrets.
    fn location(&self) -> String;
    /// Writes one object.
    fn put(&self, name: &str, data: Vec<u8>, mode: PutMode) -> Result<PutOutcome>;
    /// Writes immutable objects with [`PutMode::Create`], several at once;
    /// an object that exists already counts as written (names are content
    /// hashes). `items` is pulled as uploads finish, so the caller bounds
    /// the memory in flight by producing lazily.
    fn put_many(
        &self,
        items: &mut dyn Iterator<Item = Result<(String, Vec<u8>)>>,
        on_bytes: OnBytes<'_>,
    ) -> Result<u64>;
    /// Reads one whole object; `None` when there is none.
    fn get(&self, name: &str) -> Result<Option<Got>>;
    /// Reads byte ranges, several at once; answers in request order. A
    /// missing object or a range past its end is an error naming it.
    fn get_ranges(
        &self,
        reqs: &[(String, Range<u64>)],
        on_bytes: OnBytes<'_>,
    ) -> Result<Vec<Vec<u8>>>;
    /// The object's size; `None` when there is none.
    fn size(&self, name: &str) -> Result<Option<u64>>;
    /// Every object whose name starts with `prefix`, sorted by name.
    fn list(&self, prefix: &str) -> Result<Vec<Listed>>;
    /// Deletes an object (no error when there is none).
    fn delete(&self, name: &str) -> Result<()>;
    /// Checks that the storage can be reached and listed (the bucket
    /// exists, the credentials are accepted) with one small request.
    fn check(&self) -> Result<()>;
}

/// A chunk's stored bytes as a source returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedChunk {
    /// 0 = raw, 1 = zstd.
    pub codec: u8,
    /// Uncompressed length.
    pub raw_len: u32,
    /// The stored bytes.
    pub stored: Vec<u8>,
}

/// Where a store finds chunks its own packs lack (a lazy clone's remote).
pub trait ChunkSource: Send + Sync {
    /// Stored bytes of `ids`, in order; `None` for a chunk the source does
    /// not know. `kv` is the store's current read view. The store checks
    /// every returned chunk against its id.
    fn fetch(&self, kv: &dyn KvRead, ids: &[ChunkId]) -> Result<Vec<Option<FetchedChunk>>>;
    /// Whether the source can supply the chunk (without fetching it).
    fn has(&self, kv: &dyn KvRead, id: &ChunkId) -> Result<bool>;
    /// Drops whatever the source kept of a chunk whose bytes did not hash
    /// to its id (a damaged cache entry); the store then asks once more.
    fn forget(&self, id: &ChunkId) {
        let _ = id;
    }
    /// Fetches chunks ahead of their reads into the source's cache, in
    /// bounded batches; a no-op when the source keeps nothing (then each
    /// read fetches its chunk).
    fn prefetch(&self, kv: &dyn KvRead, ids: &[ChunkId]) -> Result<()> {
        let _ = (kv, ids);
        Ok(())
    }
}

/// Checks an object name: relative, `/`-separated, no empty, `.` or `..`
/// segment, printable.
pub fn check_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::Invalid(format!(
            "invalid object name '{name}': {why}"
        )))
    };
    if name.is_empty() || name.len() > 1024 {
        return bad("empty or longer than 1024 bytes");
    }
    if name.chars().any(|c| c.is_control()) {
        return bad("control character");
    }
    if name
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("empty, '.' or '..' segment");
    }
    Ok(())
}

/// A local folder as pack storage (a `file://` remote; a folder on a
/// shared file system). Writes go to a temporary file that is fsynced and
/// then linked (create) or renamed (update) into place; a conditional
/// update holds an exclusive `flock` on `NAME.lock` across its compare and
/// rename, which is how a folder offers `If-Match`. Entity tags are the
/// BLAKE3 hash of the content.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// Pack storage rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn etag(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    /// Writes `data` to a fresh temporary file next to `path`, fsynced.
    fn stage(path: &Path, data: &[u8]) -> Result<PathBuf> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create folder", dir, e))?;
        let rnd = crate::id::random_bytes::<8>()?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("object"),
            hex::encode(rnd)
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        let res = f
            .write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("write", &tmp, e));
        if let Err(e) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }

    fn read_whole(path: &Path) -> Result<Option<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }
}

impl PackStorage for LocalDir {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, name: &str, data: Vec<u8>, mode: PutMode) -> Result<PutOutcome> {
        let path = self.path(name)?;
        let etag = Self::etag(&data);
        let tmp = Self::stage(&path, &data)?;
        let done = |r: Result<PutOutcome>| {
            let _ = std::fs::remove_file(&tmp);
            if matches!(r, Ok(PutOutcome::Written(_))) {
                if let Some(dir) = path.parent() {
                    crate::pack::sync_dir(dir)?;
                }
            }
            r
        };
        match mode {
            PutMode::Create => match std::fs::hard_link(&tmp, &path) {
                Ok(()) => done(Ok(PutOutcome::Written(Some(etag)))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    done(Ok(PutOutcome::Exists))
                }
                Err(e) => done(Err(Error::io("create", &path, e))),
            },
            PutMode::Overwrite => match std::fs::rename(&tmp, &path) {
                Ok(()) => done(Ok(PutOutcome::Written(Some(etag)))),
                Err(e) => done(Err(Error::io("replace", &path, e))),
            },
            PutMode::Update(want) => {
                let lock_path = path.with_file_name(format!(
                    "{}.lock",
                    path.file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("object")
                ));
                let lock = match OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                {
                    Ok(l) => l,
                    Err(e) => return done(Err(Error::io("open", &lock_path, e))),
                };
                if let Err(e) = fs4::fs_std::FileExt::lock_exclusive(&lock) {
                    return done(Err(Error::io("lock", &lock_path, e)));
                }
                let r = match Self::read_whole(&path) {
                    Ok(Some(c)) if Self::etag(&c) == want => match std::fs::rename(&tmp, &path) {
                        Ok(()) => Ok(PutOutcome::Written(Some(etag))),
                        Err(e) => Err(Error::io("replace", &path, e)),
                    },
                    Ok(_) => Ok(PutOutcome::Changed),
                    Err(e) => Err(e),
                };
                let r = done(r);
                let _ = fs4::fs_std::FileExt::unlock(&lock);
                r
            }
        }
    }

    fn put_many(
        &self,
        items: &mut dyn Iterator<Item = Result<(String, Vec<u8>)>>,
        on_bytes: OnBytes<'_>,
    ) -> Result<u64> {
        let mut n = 0;
        for item in items {
            let (name, data) = item?;
            let len = data.len() as u64;
            match self.put(&name, data, PutMode::Create)? {
                PutOutcome::Written(_) | PutOutcome::Exists => {}
                PutOutcome::Changed => unreachable!("create never reports a change"),
            }
            n += len;
            on_bytes(len);
        }
        Ok(n)
    }

    fn get(&self, name: &str) -> Result<Option<Got>> {
        let path = self.path(name)?;
        Ok(Self::read_whole(&path)?.map(|data| Got {
            etag: Some(Self::etag(&data)),
            data,
        }))
    }

    fn get_ranges(
        &self,
        reqs: &[(String, Range<u64>)],
        on_bytes: OnBytes<'_>,
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(reqs.len());
        let mut open: Option<(String, File)> = None;
        for (name, r) in reqs {
            let path = self.path(name)?;
            if open.as_ref().map(|(n, _)| n != name).unwrap_or(true) {
                let f = File::open(&path).map_err(|e| Error::io("open", &path, e))?;
                open = Some((name.clone(), f));
            }
            let f = &open.as_ref().expect("opened").1;
            let mut buf = vec![0u8; (r.end.saturating_sub(r.start)) as usize];
            f.read_exact_at(&mut buf, r.start).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::corrupted(
                        path.display().to_string(),
                        format!("bytes {}..{} are past its end", r.start, r.end),
                    )
                } else {
                    Error::io("read", &path, e)
                }
            })?;
            on_bytes(buf.len() as u64);
            out.push(buf);
        }
        Ok(out)
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name)?;
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("list", &dir, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("list", &dir, e))?;
                let p = ent.path();
                let fname = ent.file_name();
                let fname = fname.to_string_lossy();
                if fname.starts_with('.') || fname.ends_with(".lock") {
                    continue;
                }
                let ft = ent.file_type().map_err(|e| Error::io("stat", &p, e))?;
                let rel = p
                    .strip_prefix(&self.root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                if ft.is_dir() {
                    if prefix.starts_with(&format!("{rel}/")) || rel.starts_with(prefix) {
                        stack.push(p);
                    }
                } else if ft.is_file() && rel.starts_with(prefix) {
                    let md = ent.metadata().map_err(|e| Error::io("stat", &p, e))?;
                    out.push(Listed {
                        name: rel,
                        size: md.len(),
                        modified_ms: mtime_ms(&md),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn check(&self) -> Result<()> {
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::Storage {
                what: self.location(),
                reason: "not a folder".into(),
            }),
            // Created by the first push.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("stat", &self.root, e)),
        }
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("delete", &path, e)),
        }
    }
}

/// A file's mtime, ms since the epoch.
pub fn mtime_ms(md: &std::fs::Metadata) -> i64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

/// Reads the last `len` bytes of a local file (used by tests and tools).
pub fn read_tail(path: &Path, len: u64) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io("seek", path, e))?;
    let from = size.saturating_sub(len);
    f.seek(SeekFrom::Start(from))
        .map_err(|e| Error::io("seek", path, e))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_exclusive_and_update_compares() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalDir::new(d.path());
        let w = s
            .put("refs/a.json", b"1".to_vec(), PutMode::Create)
            .unwrap();
        let PutOutcome::Written(Some(e1)) = w else {
            panic!("{w:?}")
        };
        assert_eq!(
            s.put("refs/a.json", b"2".to_vec(), PutMode::Create)
                .unwrap(),
            PutOutcome::Exists
        );
        assert_eq!(
            s.put("refs/a.json", b"3".to_vec(), PutMode::Update("nope".into()))
                .unwrap(),
            PutOutcome::Changed
        );
        assert!(matches!(
            s.put("refs/a.json", b"4".to_vec(), PutMode::Update(e1.clone()))
                .unwrap(),
            PutOutcome::Written(_)
        ));
        // The old tag no longer matches.
        assert_eq!(
            s.put("refs/a.json", b"5".to_vec(), PutMode::Update(e1))
                .unwrap(),
            PutOutcome::Changed
        );
        assert_eq!(s.get("refs/a.json").unwrap().unwrap().data, b"4");
        assert_eq!(
            s.list("refs/").unwrap(),
            vec![Listed {
                name: "refs/a.json".into(),
                size: 1,
                modified_ms: s.list("refs/").unwrap()[0].modified_ms,
            }]
        );
        let r = s
            .get_ranges(&[("refs/a.json".into(), 0..1)], &|_| {})
            .unwrap();
        assert_eq!(r, vec![b"4".to_vec()]);
        assert!(s
            .get_ranges(&[("refs/a.json".into(), 0..9)], &|_| {})
            .is_err());
        s.delete("refs/a.json").unwrap();
        assert!(s.get("refs/a.json").unwrap().is_none());
        assert!(s.put("../x", vec![], PutMode::Create).is_err());
    }
}
