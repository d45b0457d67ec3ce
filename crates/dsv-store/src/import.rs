//! Moving content between repositories: what a push reads and what a fetch
//! stores. Everything that comes in is checked against its id first.

use crate::error::{Error, Result};
use crate::id::{hash, ChunkId, ObjectId, VersionId};
use crate::kv::{Batch, Cf, KvRead};
use crate::object::{stored, Object};
use crate::pack::PackWriter;
use crate::schema::{self, ChunkLoc};
use crate::storage::FetchedChunk;
use crate::store::Store;

/// A metadata object as a pack record carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRecord {
    /// 0 = raw, 1 = zstd.
    pub codec: u8,
    /// Length of the canonical encoding.
    pub raw_len: u32,
    /// The stored bytes.
    pub data: Vec<u8>,
}

/// The ids an object references: child objects and chunks.
pub fn references(obj: &Object) -> (Vec<ObjectId>, Vec<ChunkId>) {
    use crate::object::{EntryTarget, TreeNode};
    match obj {
        Object::File(f) => (Vec::new(), f.chunks.iter().map(|(c, _)| *c).collect()),
        Object::Tree(TreeNode::Leaf(entries)) => {
            let mut objs = Vec::new();
            for e in entries {
                match &e.target {
                    EntryTarget::File(id) => objs.push(*id),
                    EntryTarget::Dir { id, .. } => objs.push(*id),
                    EntryTarget::Symlink(_) => {}
                }
            }
            (objs, Vec::new())
        }
        Object::Tree(TreeNode::Shard(s)) => {
            (s.children.iter().map(|(_, id)| *id).collect(), Vec::new())
        }
        Object::Version(v) => (vec![v.root], Vec::new()),
    }
}

/// The canonical bytes of an object record (codec 0 raw, 1 zstd), at most
/// the size objects may have; the caller checks them against the id.
pub fn decode_object_record(codec: u8, stored: &[u8], raw_len: u32, what: &str) -> Result<Vec<u8>> {
    if raw_len as usize > stored::MAX_OBJECT {
        return Err(Error::corrupted(
            what,
            format!("declared size {raw_len} exceeds {}", stored::MAX_OBJECT),
        ));
    }
    let out = match codec {
        0 => stored.to_vec(),
        1 => zstd::bulk::decompress(stored, raw_len as usize)
            .map_err(|e| Error::corrupted(what, format!("zstd: {e}")))?,
        c => return Err(Error::corrupted(what, format!("unknown codec {c}"))),
    };
    if out.len() != raw_len as usize {
        return Err(Error::corrupted(
            what,
            "decoded length differs from the record's",
        ));
    }
    Ok(out)
}

/// Decodes an object's canonical bytes after checking them against `id`.
pub fn check_object(id: &ObjectId, canonical: &[u8], what: &str) -> Result<Object> {
    let got = hash(canonical);
    if &got != id.as_bytes() {
        return Err(Error::corrupted(
            what,
            format!("object {id}: its bytes hash to {}", hex::encode(got)),
        ));
    }
    Object::decode(canonical, what)
}

impl Store {
    /// The stored bytes of a chunk in this repository's packs.
    pub fn read_stored_chunk(&self, id: &ChunkId) -> Result<(ChunkLoc, Vec<u8>)> {
        let loc = self.chunk_loc(id)?;
        let data = self.read_stored_at(id, &loc)?;
        Ok((loc, data))
    }

    /// The stored bytes of a chunk at a location read before (one index
    /// lookup fewer than [`Store::read_stored_chunk`]). On a team
    /// repository, a chunk of another machine's pack comes from the shared
    /// object store (through the chunk source and its cache, checked).
    pub fn read_stored_at(&self, id: &ChunkId, loc: &ChunkLoc) -> Result<Vec<u8>> {
        if self.pack_storage().is_some() && !self.pack_is_local(loc.pack) {
            return self.shared_stored(&*self.reader(), id);
        }
        self.pack_reader().read_stored(id, loc)
    }

    /// An object decoded, and as a pack record carries it — one read.
    pub fn object_with_record(&self, id: &ObjectId) -> Result<(Object, ObjectRecord)> {
        let v = self
            .reader()
            .get(Cf::Objects, id.as_bytes())?
            .ok_or_else(|| Error::not_found(crate::error::Kind::Object, id.to_hex()))?;
        let what = format!("object {id}");
        // Checked against its id: a damaged object never leaves.
        let obj = check_object(id, &stored::unwrap(&v, &what)?, &what)?;
        Ok((obj, record_of(v, &what)?))
    }

    /// An object as a pack record carries it (its stored form, unwrapped
    /// into codec, canonical length and data; nothing is recompressed).
    pub fn object_record(&self, id: &ObjectId) -> Result<ObjectRecord> {
        let v = self
            .reader()
            .get(Cf::Objects, id.as_bytes())?
            .ok_or_else(|| Error::not_found(crate::error::Kind::Object, id.to_hex()))?;
        record_of(v, &format!("object {id}"))
    }
}

fn record_of(v: Vec<u8>, what: &str) -> Result<ObjectRecord> {
    match v.first() {
        Some(&stored::CODEC_RAW) => Ok(ObjectRecord {
            codec: 0,
            raw_len: (v.len() - 1) as u32,
            data: v[1..].to_vec(),
        }),
        Some(&stored::CODEC_ZSTD) if v.len() >= 5 => Ok(ObjectRecord {
            codec: 1,
            raw_len: u32::from_le_bytes(v[1..5].try_into().expect("4 bytes")),
            data: v[5..].to_vec(),
        }),
        _ => Err(Error::corrupted(what, "unknown object codec")),
    }
}

impl Store {
    /// Whether an object is stored here.
    pub fn has_object(&self, id: &ObjectId) -> Result<bool> {
        self.reader().contains(Cf::Objects, id.as_bytes())
    }

    /// Puts objects that came from elsewhere into `b` (each checked against
    /// its id and decoded first; those stored already are skipped).
    pub fn import_objects_batch(
        &self,
        kv: &dyn KvRead,
        objects: &[(ObjectId, Vec<u8>)],
        b: &mut Batch,
    ) -> Result<()> {
        for (id, canonical) in objects {
            check_object(id, canonical, &format!("object {id}"))?;
            if kv.contains(Cf::Objects, id.as_bytes())? {
                continue;
            }
            b.put(
                Cf::Objects,
                id.as_bytes().to_vec(),
                stored::wrap(canonical, self.config().compression_level),
            );
        }
        Ok(())
    }

    /// Registers a version whose object is stored (or in `b`) as a root.
    pub fn import_version_root_batch(&self, id: &VersionId, created_ms: i64, b: &mut Batch) {
        b.put(
            Cf::Roots,
            schema::root_version_key(id),
            created_ms.to_le_bytes().to_vec(),
        );
    }

    /// Stores chunks that came from elsewhere (a remote) in new packs and
    /// indexes them in one write; each is checked against its id first.
    /// Chunks stored already are skipped. Returns the stored bytes added.
    pub fn import_chunks(
        &self,
        chunks: &mut dyn Iterator<Item = Result<(ChunkId, FetchedChunk)>>,
    ) -> Result<u64> {
        self.check_writable()?;
        let mut chunks = chunks.peekable();
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        // Indexed every IMPORT_COMMIT bytes: a download that fails late keeps
        // what it stored before.
        while chunks.peek().is_some() {
            total += self.import_some(&mut chunks, &mut seen)?;
        }
        Ok(total)
    }

    fn import_some(
        &self,
        chunks: &mut dyn Iterator<Item = Result<(ChunkId, FetchedChunk)>>,
        seen: &mut std::collections::HashSet<ChunkId>,
    ) -> Result<u64> {
        const IMPORT_COMMIT: u64 = 256 << 20;
        let writer = PackWriter::new(self.packs_dir(), self.config().pack_target_size);
        let mut new = Vec::new();
        let mut bytes = 0u64;
        let mut failed = None;
        for item in &mut *chunks {
            let (id, c) = match item {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if let Err(e) = crate::compress::decode_chunk(&id, c.codec, &c.stored, c.raw_len) {
                failed = Some(e);
                break;
            }
            if !seen.insert(id) || self.has_chunk(&id)? {
                continue;
            }
            match writer.append(&id, c.codec, c.raw_len, &c.stored) {
                Ok(loc) => {
                    bytes += c.stored.len() as u64;
                    new.push((id, loc));
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            if bytes >= IMPORT_COMMIT {
                break;
            }
        }
        let packs = writer.finish();
        let packs = match packs {
            Ok(p) => p,
            Err(e) => return Err(failed.unwrap_or(e)),
        };
        if !new.is_empty() {
            if let Err(e) = self.publish_packs(&packs.ids()) {
                packs.discard();
                return Err(e);
            }
            let r = self.write(|kv| {
                let mut b = Batch::default();
                for (id, loc) in &new {
                    if !kv.contains(Cf::Chunks, id.as_bytes())? {
                        b.put(Cf::Chunks, id.as_bytes().to_vec(), loc.encode());
                        b.delete(Cf::Meta, schema::damaged_key(id));
                    }
                }
                Ok((b, ()))
            });
            if let Err(e) = r {
                packs.discard();
                return Err(e);
            }
            drop(packs);
        } else {
            packs.discard();
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }
}
