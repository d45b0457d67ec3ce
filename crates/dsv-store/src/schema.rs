//! The RocksDB key schema: every column family's keys and values, in one
//! place. Keys that must sort (sequence numbers) are big-endian; stored
//! values are little-endian. `docs/FORMAT.md` documents each layout.

use crate::codec::{Dec, Enc};
use crate::error::Result;
use crate::id::{ChunkId, DraftId, ObjectId, VersionId};

/// Repository format version stored under [`META_FORMAT`] and in
/// `config.json` (2: feature flags in `config.json`, salted version
/// objects; see `docs/FORMAT.md`).
pub const REPO_FORMAT: u32 = 2;
/// `meta` key: repository format version (u32 LE).
pub const META_FORMAT: &[u8] = b"format";
/// `meta` key: gc generation (u64 LE), bumped by every gc that deletes.
pub const META_GC_GENERATION: &[u8] = b"gc_generation";

/// `meta` key prefix of damaged chunks: `damaged/` · chunk id [32] →
/// [`DamagedChunk`]. Written by `fsck --repair` in the same batch that removes
/// the chunk's index entry; deleted when an intact copy is stored again, or
/// by `gc` once nothing references the chunk.
pub const META_DAMAGED: &[u8] = b"damaged/";

/// `meta` key of a damaged chunk.
pub fn damaged_key(id: &ChunkId) -> Vec<u8> {
    let mut k = Vec::with_capacity(META_DAMAGED.len() + 32);
    k.extend_from_slice(META_DAMAGED);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A chunk whose stored copy was found damaged and taken out of the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedChunk {
    /// Where the damaged copy was (its index entry when it was marked).
    pub loc: ChunkLoc,
    /// When it was marked, ms since the Unix epoch.
    pub marked_ms: i64,
    /// What was wrong with it.
    pub reason: String,
}

impl DamagedChunk {
    /// `loc (25 bytes) | marked_ms i64 | reason str32`, LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(CHUNK_LOC_LEN + 12 + self.reason.len());
        e.raw(&self.loc.encode())
            .i64(self.marked_ms)
            .bytes32(self.reason.as_bytes());
        e.buf
    }
    /// Strict decode.
    pub fn decode(v: &[u8], id: &ChunkId) -> Result<Self> {
        let what = format!("damaged-chunk record {id}");
        let mut d = Dec::new(v, &what);
        let loc = ChunkLoc::decode(d.take(CHUNK_LOC_LEN)?, id)?;
        let marked_ms = d.i64()?;
        let reason = d.str32()?;
        d.finish()?;
        Ok(DamagedChunk {
            loc,
            marked_ms,
            reason,
        })
    }
}

/// `roots` key prefix for finalized versions.
pub const ROOT_VERSION: u8 = b'v';
/// `roots` key prefix for roots the porcelain registers.
pub const ROOT_APP: u8 = b'a';

/// `tags` key prefix: tag → version.
pub const TAG_BY_NAME: u8 = b'n';
/// `tags` key prefix: version → tag.
pub const TAG_BY_VERSION: u8 = b'v';

/// Key of a finalized version's root entry.
pub fn root_version_key(id: &VersionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(ROOT_VERSION);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Key of a porcelain root.
pub fn root_app_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(ROOT_APP);
    k.extend_from_slice(name);
    k
}

/// `tags` key for (tag → version).
pub fn tag_by_name_key(tag: &str, id: &VersionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tag.len() + 32);
    k.push(TAG_BY_NAME);
    k.extend_from_slice(tag.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of every version carrying `tag`.
pub fn tag_by_name_prefix(tag: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + tag.len());
    k.push(TAG_BY_NAME);
    k.extend_from_slice(tag.as_bytes());
    k.push(0);
    k
}

/// `tags` key for (version → tag).
pub fn tag_by_version_key(id: &VersionId, tag: &str) -> Vec<u8> {
    let mut k = tag_by_version_prefix(id);
    k.extend_from_slice(tag.as_bytes());
    k
}

/// Prefix of every tag of a version.
pub fn tag_by_version_prefix(id: &VersionId) -> Vec<u8> {
    let mut k = Vec::with_capacity(33 + 16);
    k.push(TAG_BY_VERSION);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Where a chunk is stored: value of the `chunks` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    /// Pack file id (`packs/{pack:016x}.pack`).
    pub pack: u64,
    /// Byte offset of the chunk's record header in the pack.
    pub offset: u64,
    /// Stored (possibly compressed) data length.
    pub stored_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// 0 = raw, 1 = zstd.
    pub codec: u8,
}

/// Encoded length of a [`ChunkLoc`].
pub const CHUNK_LOC_LEN: usize = 25;

impl ChunkLoc {
    /// `pack u64 | offset u64 | stored_len u32 | raw_len u32 | codec u8`, LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(CHUNK_LOC_LEN);
        e.u64(self.pack)
            .u64(self.offset)
            .u32(self.stored_len)
            .u32(self.raw_len)
            .u8(self.codec);
        e.buf
    }
    /// Strict decode.
    pub fn decode(v: &[u8], id: &ChunkId) -> Result<Self> {
        let what = format!("chunk index entry {id}");
        let mut d = Dec::new(v, &what);
        let loc = ChunkLoc {
            pack: d.u64()?,
            offset: d.u64()?,
            stored_len: d.u32()?,
            raw_len: d.u32()?,
            codec: d.u8()?,
        };
        if loc.codec > 1 {
            return Err(d.err(format!("unknown codec {}", loc.codec)));
        }
        d.finish()?;
        Ok(loc)
    }
}

/// A file's stat fingerprint: value of the `statcache` column family
/// (key: the file's absolute path bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatEntry {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, ns since the epoch.
    pub ctime_ns: i64,
    /// Inode number.
    pub ino: u64,
    /// Device number.
    pub dev: u64,
    /// Permission bits.
    pub mode: u32,
    /// The file object the content hashed to.
    pub file: ObjectId,
}

impl StatEntry {
    /// `size u64 | mtime i64 | ctime i64 | ino u64 | dev u64 | mode u32 | file id [32]`, LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(76);
        e.u64(self.size)
            .i64(self.mtime_ns)
            .i64(self.ctime_ns)
            .u64(self.ino)
            .u64(self.dev)
            .u32(self.mode);
        e.raw(self.file.as_bytes());
        e.buf
    }
    /// Strict decode.
    pub fn decode(v: &[u8]) -> Result<Self> {
        let mut d = Dec::new(v, "stat cache entry");
        let s = StatEntry {
            size: d.u64()?,
            mtime_ns: d.i64()?,
            ctime_ns: d.i64()?,
            ino: d.u64()?,
            dev: d.u64()?,
            mode: d.u32()?,
            file: ObjectId(d.id()?),
        };
        d.finish()?;
        Ok(s)
    }
    /// Whether the stat fields (not the file id) equal `other`'s.
    pub fn same_stat(&self, other: &StatEntry) -> bool {
        self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.ino == other.ino
            && self.dev == other.dev
            && self.mode == other.mode
    }
}

/// A draft's state: value of the `drafts` column family (key: draft id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftRecord {
    /// Parents the version will have.
    pub parents: Vec<VersionId>,
    /// Current staged root tree.
    pub root: ObjectId,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Bytes newly stored by this draft's changes so far.
    pub stored_bytes: u64,
    /// Once finalized: the version it became (the draft then accepts no changes).
    pub finalized: Option<VersionId>,
}

/// Draft record format version.
pub const DRAFT_FORMAT: u8 = 1;

impl DraftRecord {
    /// `format u8 | root [32] | created i64 | stored u64 | finalized flag u8 [+ id] | n u16 | parents`.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(64 + self.parents.len() * 32);
        e.u8(DRAFT_FORMAT)
            .raw(self.root.as_bytes())
            .i64(self.created_ms)
            .u64(self.stored_bytes);
        match &self.finalized {
            Some(v) => e.u8(1).raw(v.as_bytes()),
            None => e.u8(0),
        };
        e.u16(self.parents.len() as u16);
        for p in &self.parents {
            e.raw(p.as_bytes());
        }
        e.buf
    }
    /// Strict decode.
    pub fn decode(v: &[u8], id: &DraftId) -> Result<Self> {
        let what = format!("draft {id}");
        let mut d = Dec::new(v, &what);
        let fmt = d.u8()?;
        if fmt != DRAFT_FORMAT {
            return Err(d.err(format!("unknown draft format {fmt}")));
        }
        let root = ObjectId(d.id()?);
        let created_ms = d.i64()?;
        let stored_bytes = d.u64()?;
        let finalized = match d.u8()? {
            0 => None,
            1 => Some(VersionId(d.id()?)),
            x => return Err(d.err(format!("bad finalized flag {x}"))),
        };
        let n = d.u16()? as usize;
        let mut parents = Vec::with_capacity(n);
        for _ in 0..n {
            parents.push(VersionId(d.id()?));
        }
        d.finish()?;
        Ok(Self {
            parents,
            root,
            created_ms,
            stored_bytes,
            finalized,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::hash;

    #[test]
    fn values_round_trip() {
        let id = ChunkId(hash(b"c"));
        let loc = ChunkLoc {
            pack: 7,
            offset: 99,
            stored_len: 10,
            raw_len: 20,
            codec: 1,
        };
        assert_eq!(ChunkLoc::decode(&loc.encode(), &id).unwrap(), loc);
        assert!(ChunkLoc::decode(&loc.encode()[..10], &id).is_err());
        let s = StatEntry {
            size: 1,
            mtime_ns: 2,
            ctime_ns: 3,
            ino: 4,
            dev: 5,
            mode: 0o644,
            file: ObjectId(hash(b"f")),
        };
        assert_eq!(StatEntry::decode(&s.encode()).unwrap(), s);
        let did = DraftId(hash(b"d"));
        let d = DraftRecord {
            parents: vec![VersionId(hash(b"p"))],
            root: ObjectId(hash(b"r")),
            created_ms: 5,
            stored_bytes: 6,
            finalized: Some(VersionId(hash(b"v"))),
        };
        assert_eq!(DraftRecord::decode(&d.encode(), &did).unwrap(), d);
    }

    #[test]
    fn tag_keys_sort_by_tag_then_version() {
        let v = VersionId(hash(b"v"));
        assert!(tag_by_name_key("a", &v).starts_with(&tag_by_name_prefix("a")));
        assert!(!tag_by_name_key("ab", &v).starts_with(&tag_by_name_prefix("a")));
        assert!(tag_by_version_key(&v, "x").starts_with(&tag_by_version_prefix(&v)));
    }
}
