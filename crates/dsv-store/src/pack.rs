//! Pack files: append-only files of compressed chunks, outside the LSM tree.
//!
//! Chunk data never passes through RocksDB's memtables, WAL or compactions:
//! it is appended once to a pack file, fsynced, and only then indexed (chunk
//! id → pack, offset) in the same atomic batch as the objects that use it.
//! A writer keeps an exclusive `flock` on each pack it writes until its
//! commit is done, so `gc` never deletes a pack that is about to be indexed.
//! A crash leaves at worst an unindexed pack, which `gc` removes.
//!
//! Layout: a 16-byte header (`DSVPACK\0`, format u32 LE, reserved u32), then
//! records `codec u8 | raw_len u32 | stored_len u32 | chunk id [32] | data`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

fn random_pack_id() -> u64 {
    let d = crate::id::DraftId::random();
    u64::from_le_bytes(
        d.0[..8]
            .try_into()
            .expect("8 bytes because the id is 32 bytes"),
    )
}

struct OpenPack {
    id: u64,
    path: PathBuf,
    lock: File,
    out: std::io::BufWriter<File>,
    len: u64,
}

/// Packs written by one operation, held locked until it commits.
pub struct PackWriter {
    dir: PathBuf,
    target_size: u64,
    current: Mutex<Option<OpenPack>>,
    done: Mutex<Vec<(u64, PathBuf, File)>>,
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
    /// Deletes the packs (the operation failed before indexing them).
    pub fn discard(self) {
        for (_, path, _) in &self.held {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl PackWriter {
    /// A writer creating packs in `dir`, each up to about `target_size` bytes.
    pub fn new(dir: impl Into<PathBuf>, target_size: u64) -> Self {
        Self {
            dir: dir.into(),
            target_size,
            current: Mutex::new(None),
            done: Mutex::new(Vec::new()),
        }
    }

    fn open_new(&self) -> Result<OpenPack> {
        loop {
            let id = random_pack_id();
            let path = pack_path(&self.dir, id);
            let file = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create pack", &path, e)),
            };
            let lock = file
                .try_clone()
                .map_err(|e| Error::io("dup pack", &path, e))?;
            fs4::fs_std::FileExt::try_lock_exclusive(&lock)
                .map_err(|e| Error::io("lock pack", &path, e))?;
            let mut out = std::io::BufWriter::with_capacity(4 << 20, file);
            out.write_all(PACK_MAGIC)
                .map_err(|e| Error::io("write pack", &path, e))?;
            out.write_all(&PACK_FORMAT.to_le_bytes())
                .map_err(|e| Error::io("write pack", &path, e))?;
            out.write_all(&0u32.to_le_bytes())
                .map_err(|e| Error::io("write pack", &path, e))?;
            return Ok(OpenPack {
                id,
                path,
                lock,
                out,
                len: PACK_HEADER_LEN,
            });
        }
    }

    fn seal(&self, p: OpenPack) -> Result<()> {
        let OpenPack {
            id,
            path,
            lock,
            out,
            ..
        } = p;
        let file = out
            .into_inner()
            .map_err(|e| Error::io("flush pack", &path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync pack", &path, e))?;
        self.done
            .lock()
            .map_err(|_| Error::Kv("pack writer poisoned".into()))?
            .push((id, path, lock));
        Ok(())
    }

    /// Appends one stored chunk; returns where it went. A pack that
    /// reached its target size is fsynced after the lock is released, so
    /// the other threads keep appending meanwhile.
    pub fn append(&self, id: &ChunkId, codec: u8, raw_len: u32, data: &[u8]) -> Result<ChunkLoc> {
        let mut full = None;
        let loc = {
            let mut cur = self
                .current
                .lock()
                .map_err(|_| Error::Kv("pack writer poisoned".into()))?;
            if cur.as_ref().is_some_and(|p| p.len >= self.target_size) {
                full = cur.take();
            }
            if cur.is_none() {
                *cur = Some(self.open_new()?);
            }
            let p = cur.as_mut().expect("set above because it was None");
            let offset = p.len;
            let mut head = [0u8; RECORD_HEADER_LEN as usize];
            head[0] = codec;
            head[1..5].copy_from_slice(&raw_len.to_le_bytes());
            head[5..9].copy_from_slice(&(data.len() as u32).to_le_bytes());
            head[9..41].copy_from_slice(id.as_bytes());
            p.out
                .write_all(&head)
                .map_err(|e| Error::io("write pack", &p.path, e))?;
            p.out
                .write_all(data)
                .map_err(|e| Error::io("write pack", &p.path, e))?;
            p.len += RECORD_HEADER_LEN + data.len() as u64;
            ChunkLoc {
                pack: p.id,
                offset,
                stored_len: data.len() as u32,
                raw_len,
                codec,
            }
        };
        if let Some(f) = full {
            self.seal(f)?;
        }
        Ok(loc)
    }

    /// Flushes and fsyncs every pack (and the folder); the packs stay locked
    /// until the returned value is dropped, which must be after the commit.
    pub fn finish(self) -> Result<WrittenPacks> {
        let cur = self
            .current
            .lock()
            .map_err(|_| Error::Kv("pack writer poisoned".into()))?
            .take();
        if let Some(p) = cur {
            self.seal(p)?;
        }
        let held = std::mem::take(
            &mut *self
                .done
                .lock()
                .map_err(|_| Error::Kv("pack writer poisoned".into()))?,
        );
        if !held.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(WrittenPacks { held })
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
    if d.take(8)? != PACK_MAGIC {
        return Err(d.err("bad pack magic"));
    }
    let fmt = d.u32()?;
    if fmt != PACK_FORMAT {
        return Err(Error::UnsupportedFormatVersion {
            what: what.to_string(),
            found: fmt,
            supported: PACK_FORMAT,
        });
    }
    d.u32()?;
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
