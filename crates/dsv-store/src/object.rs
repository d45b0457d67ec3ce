//! Objects and their canonical encodings.
//!
//! Every object is encoded as `[type tag u8][format version u8][payload]`,
//! little-endian throughout; its id is BLAKE3 of exactly those bytes. The
//! decoders are strict: they reject trailing bytes, unsorted or duplicate
//! tree entries, bad names and unknown tags, so one id has one encoding.
//! See `docs/FORMAT.md` for the byte layouts.

use std::collections::BTreeMap;

use crate::codec::{Dec, Enc};
use crate::error::{Error, Result};
use crate::id::{hash, ChunkId, ObjectId, VersionId};

/// Object format version of files and tree nodes (and of unsalted versions,
/// the only versions format-1 repositories hold).
pub const OBJECT_FORMAT: u8 = 1;
/// Object format version of a salted version object: the format-1 payload
/// followed by a 16-byte random salt (repository format 2, feature
/// `version-salt`).
pub const VERSION_FORMAT_SALTED: u8 = 2;
/// Length of a version object's salt.
pub const SALT_LEN: usize = 16;
/// Tag of a file manifest.
pub const TAG_FILE: u8 = 1;
/// Tag of a tree leaf (a directory's entries, or one shard of them).
pub const TAG_TREE_LEAF: u8 = 2;
/// Tag of a tree shard node (a directory split by name hash).
pub const TAG_TREE_SHARD: u8 = 3;
/// Tag of a version.
pub const TAG_VERSION: u8 = 4;

/// A directory with more entries than this is split into hashed shards.
pub const LEAF_MAX_ENTRIES: usize = 256;
/// Longest entry name, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Longest symlink target, in bytes.
pub const MAX_LINK_LEN: usize = 4096;
/// Deepest shard level (levels index bytes of the 32-byte name hash).
pub const MAX_SHARD_LEVEL: u8 = 31;

/// A file: its size and ordered chunk list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileObject {
    /// Total bytes.
    pub size: u64,
    /// Chunks in order with their lengths.
    pub chunks: Vec<(ChunkId, u32)>,
}

/// What a tree entry points to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryTarget {
    /// A regular file (id of its [`FileObject`]).
    File(ObjectId),
    /// A directory (id of its root tree node) with the number of files below it.
    Dir {
        /// Tree node id.
        id: ObjectId,
        /// Files (and symlinks) anywhere below.
        file_count: u64,
    },
    /// A symbolic link, stored as its target bytes; never followed.
    Symlink(Vec<u8>),
}

/// One name in a directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// File name bytes (no `/`, no NUL, not `.` or `..`; need not be UTF-8).
    pub name: Vec<u8>,
    /// Unix permission bits (`0o777` mask).
    pub mode: u32,
    /// File size; for a directory the total size of the files below it.
    pub size: u64,
    /// What the name points to.
    pub target: EntryTarget,
}

impl Entry {
    /// Files counted by this entry (1 for a file or link).
    pub fn file_count(&self) -> u64 {
        match self.target {
            EntryTarget::Dir { file_count, .. } => file_count,
            _ => 1,
        }
    }
    /// Whether this is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.target, EntryTarget::Dir { .. })
    }
}

/// A shard node: a directory's entries split by byte `level` of BLAKE3(name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardNode {
    /// Which byte of the name hash selects the child.
    pub level: u8,
    /// Names in this node (all children together).
    pub entry_count: u64,
    /// Files below this node.
    pub file_count: u64,
    /// Bytes below this node.
    pub total_size: u64,
    /// Present children, ascending by bucket.
    pub children: Vec<(u8, ObjectId)>,
}

/// Summary of a directory node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirSummary {
    /// Names directly in the directory.
    pub entry_count: u64,
    /// Files anywhere below.
    pub file_count: u64,
    /// Bytes anywhere below.
    pub total_size: u64,
}

/// A tree node: a leaf of entries or a shard node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeNode {
    /// Entries sorted by name.
    Leaf(Vec<Entry>),
    /// Hash-sharded children.
    Shard(ShardNode),
}

impl TreeNode {
    /// The node's summary.
    pub fn summary(&self) -> DirSummary {
        match self {
            TreeNode::Leaf(entries) => DirSummary {
                entry_count: entries.len() as u64,
                file_count: entries.iter().map(Entry::file_count).sum(),
                total_size: entries.iter().map(|e| e.size).sum(),
            },
            TreeNode::Shard(s) => DirSummary {
                entry_count: s.entry_count,
                file_count: s.file_count,
                total_size: s.total_size,
            },
        }
    }
}

/// The change a version made to its first parent, stored in the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Delta {
    /// New paths.
    pub added: u64,
    /// Paths whose content or mode changed.
    pub modified: u64,
    /// Paths gone.
    pub removed: u64,
    /// Paths moved (same content, new path).
    pub renamed: u64,
    /// Logical bytes of added and modified files.
    pub added_bytes: u64,
    /// Bytes this version newly stored (compressed chunks and metadata).
    pub stored_bytes: u64,
}

/// A version: an immutable snapshot of a root tree with lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionObject {
    /// Root tree node.
    pub root: ObjectId,
    /// Parents (0 for a first version, 2+ for a merge).
    pub parents: Vec<VersionId>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
    /// Free text.
    pub message: String,
    /// Sorted key → value strings (the porcelain keeps its fields here).
    pub metadata: BTreeMap<String, String>,
    /// Change against the first parent.
    pub delta: Delta,
    /// Files in the version.
    pub file_count: u64,
    /// Bytes in the version.
    pub total_bytes: u64,
    /// Random bytes that make the id unique: two versions with the same
    /// tree, parents, message and millisecond (in two datasets, or on two
    /// machines) still get different ids. `None` in versions written by
    /// format-1 builds (encoded with object format 1).
    pub salt: Option<[u8; SALT_LEN]>,
}

/// Any decoded object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// A file manifest.
    File(FileObject),
    /// A tree node.
    Tree(TreeNode),
    /// A version.
    Version(VersionObject),
}

impl Object {
    /// A short name of the type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Object::File(_) => "file",
            Object::Tree(_) => "tree",
            Object::Version(_) => "version",
        }
    }
}

/// Checks an entry name.
pub fn validate_name(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name too long");
    }
    if name == b"." || name == b".." {
        return Err("'.' or '..' as a name");
    }
    if name.iter().any(|&b| b == b'/' || b == 0) {
        return Err("'/' or NUL in a name");
    }
    Ok(())
}

/// The shard bucket of `name` at `level`.
pub fn shard_bucket(name: &[u8], level: u8) -> u8 {
    hash(name)[level as usize % 32]
}

fn header(tag: u8, cap: usize) -> Enc {
    let mut e = Enc::with_capacity(cap + 2);
    e.u8(tag).u8(OBJECT_FORMAT);
    e
}

impl FileObject {
    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = header(TAG_FILE, 12 + self.chunks.len() * 36);
        e.u64(self.size).u32(self.chunks.len() as u32);
        for (id, len) in &self.chunks {
            e.raw(id.as_bytes()).u32(*len);
        }
        e.buf
    }
}

fn encode_entry(e: &mut Enc, entry: &Entry) {
    let kind = match entry.target {
        EntryTarget::File(_) => 1,
        EntryTarget::Dir { .. } => 2,
        EntryTarget::Symlink(_) => 3,
    };
    e.u8(kind)
        .bytes16(&entry.name)
        .u32(entry.mode)
        .u64(entry.size);
    match &entry.target {
        EntryTarget::File(id) => {
            e.raw(id.as_bytes());
        }
        EntryTarget::Dir { id, file_count } => {
            e.raw(id.as_bytes()).u64(*file_count);
        }
        EntryTarget::Symlink(t) => {
            e.bytes16(t);
        }
    }
}

impl TreeNode {
    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            TreeNode::Leaf(entries) => {
                let mut e = header(TAG_TREE_LEAF, 4 + entries.len() * 64);
                e.u32(entries.len() as u32);
                for entry in entries {
                    encode_entry(&mut e, entry);
                }
                e.buf
            }
            TreeNode::Shard(s) => {
                let mut e = header(TAG_TREE_SHARD, 57 + s.children.len() * 32);
                e.u8(s.level)
                    .u64(s.entry_count)
                    .u64(s.file_count)
                    .u64(s.total_size);
                let mut bitmap = [0u8; 32];
                for (b, _) in &s.children {
                    bitmap[(*b / 8) as usize] |= 1 << (b % 8);
                }
                e.raw(&bitmap);
                for (_, id) in &s.children {
                    e.raw(id.as_bytes());
                }
                e.buf
            }
        }
    }
}

impl VersionObject {
    /// Canonical encoding: object format 1 without a salt, 2 with one (the
    /// salt then follows the format-1 payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(258);
        e.u8(TAG_VERSION).u8(match self.salt {
            None => OBJECT_FORMAT,
            Some(_) => VERSION_FORMAT_SALTED,
        });
        e.raw(self.root.as_bytes()).u16(self.parents.len() as u16);
        for p in &self.parents {
            e.raw(p.as_bytes());
        }
        e.i64(self.created_ms).bytes32(self.message.as_bytes());
        e.u32(self.metadata.len() as u32);
        for (k, v) in &self.metadata {
            e.bytes16(k.as_bytes()).bytes32(v.as_bytes());
        }
        let d = &self.delta;
        e.u64(d.added).u64(d.modified).u64(d.removed).u64(d.renamed);
        e.u64(d.added_bytes).u64(d.stored_bytes);
        e.u64(self.file_count).u64(self.total_bytes);
        if let Some(salt) = &self.salt {
            e.raw(salt);
        }
        e.buf
    }

    /// The version's id.
    pub fn id(&self) -> VersionId {
        VersionId(hash(&self.encode()))
    }
}

impl Object {
    /// Canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Object::File(f) => f.encode(),
            Object::Tree(t) => t.encode(),
            Object::Version(v) => v.encode(),
        }
    }

    /// Decodes a canonical encoding. `what` names the object in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Object> {
        let mut d = Dec::new(bytes, what);
        let tag = d.u8()?;
        let version = d.u8()?;
        // Versions exist in formats 1 (unsalted) and 2 (salted); every other
        // object only in format 1.
        let newest = if tag == TAG_VERSION {
            VERSION_FORMAT_SALTED
        } else {
            OBJECT_FORMAT
        };
        if version == 0 || version > newest {
            return Err(Error::UnsupportedFormatVersion {
                what: what.to_string(),
                found: version as u32,
                supported: newest as u32,
            });
        }
        let obj = match tag {
            TAG_FILE => Object::File(decode_file(&mut d)?),
            TAG_TREE_LEAF => Object::Tree(TreeNode::Leaf(decode_leaf(&mut d)?)),
            TAG_TREE_SHARD => Object::Tree(TreeNode::Shard(decode_shard(&mut d)?)),
            TAG_VERSION => Object::Version(decode_version(&mut d, version)?),
            other => return Err(d.err(format!("unknown object tag {other}"))),
        };
        d.finish()?;
        Ok(obj)
    }
}

fn decode_file(d: &mut Dec<'_, '_>) -> Result<FileObject> {
    let size = d.u64()?;
    let n = d.u32()? as usize;
    if n > d.remaining() / 36 {
        return Err(d.err(format!("{n} chunks do not fit")));
    }
    let mut chunks = Vec::with_capacity(n);
    let mut total: u64 = 0;
    for _ in 0..n {
        let id = ChunkId(d.id()?);
        let len = d.u32()?;
        if len == 0 {
            return Err(d.err("empty chunk in file"));
        }
        total += len as u64;
        chunks.push((id, len));
    }
    if total != size {
        return Err(d.err(format!("chunk lengths sum to {total}, file size is {size}")));
    }
    Ok(FileObject { size, chunks })
}

fn decode_entry(d: &mut Dec<'_, '_>) -> Result<Entry> {
    let kind = d.u8()?;
    let name = d.bytes16()?.to_vec();
    validate_name(&name).map_err(|r| d.err(r))?;
    let mode = d.u32()?;
    if mode & !0o7777 != 0 {
        return Err(d.err(format!("mode {mode:o} has bits outside 0o7777")));
    }
    let size = d.u64()?;
    let target = match kind {
        1 => EntryTarget::File(ObjectId(d.id()?)),
        2 => EntryTarget::Dir {
            id: ObjectId(d.id()?),
            file_count: d.u64()?,
        },
        3 => {
            let t = d.bytes16()?.to_vec();
            if t.len() > MAX_LINK_LEN {
                return Err(d.err("symlink target too long"));
            }
            if size != t.len() as u64 {
                return Err(d.err("symlink size differs from its target length"));
            }
            EntryTarget::Symlink(t)
        }
        other => return Err(d.err(format!("unknown entry kind {other}"))),
    };
    Ok(Entry {
        name,
        mode,
        size,
        target,
    })
}

fn decode_leaf(d: &mut Dec<'_, '_>) -> Result<Vec<Entry>> {
    let n = d.u32()? as usize;
    if n > d.remaining() / 16 {
        return Err(d.err(format!("{n} entries do not fit")));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    for _ in 0..n {
        let e = decode_entry(d)?;
        if let Some(prev) = entries.last() {
            if prev.name >= e.name {
                return Err(d.err("tree entries not strictly sorted"));
            }
        }
        entries.push(e);
    }
    Ok(entries)
}

fn decode_shard(d: &mut Dec<'_, '_>) -> Result<ShardNode> {
    let level = d.u8()?;
    if level > MAX_SHARD_LEVEL {
        return Err(d.err(format!("shard level {level} too deep")));
    }
    let entry_count = d.u64()?;
    let file_count = d.u64()?;
    let total_size = d.u64()?;
    let bitmap = d.id()?;
    let mut children = Vec::new();
    for b in 0..=255u8 {
        if bitmap[(b / 8) as usize] & (1 << (b % 8)) != 0 {
            children.push((b, ObjectId(d.id()?)));
        }
    }
    // One child is legal: more than 256 names can share the hash byte of a
    // level (crafted names, or chance).
    if children.is_empty() || entry_count <= LEAF_MAX_ENTRIES as u64 {
        return Err(d.err("shard node that should be a leaf"));
    }
    Ok(ShardNode {
        level,
        entry_count,
        file_count,
        total_size,
        children,
    })
}

fn decode_version(d: &mut Dec<'_, '_>, format: u8) -> Result<VersionObject> {
    let root = ObjectId(d.id()?);
    let np = d.u16()? as usize;
    let mut parents = Vec::with_capacity(np.min(64));
    for _ in 0..np {
        parents.push(VersionId(d.id()?));
    }
    let created_ms = d.i64()?;
    let message = d.str32()?;
    let nm = d.u32()? as usize;
    let mut metadata = BTreeMap::new();
    let mut last: Option<String> = None;
    for _ in 0..nm {
        let k = d.str16()?;
        let v = d.str32()?;
        if last.as_ref().is_some_and(|l| *l >= k) {
            return Err(d.err("metadata keys not strictly sorted"));
        }
        last = Some(k.clone());
        metadata.insert(k, v);
    }
    let delta = Delta {
        added: d.u64()?,
        modified: d.u64()?,
        removed: d.u64()?,
        renamed: d.u64()?,
        added_bytes: d.u64()?,
        stored_bytes: d.u64()?,
    };
    let file_count = d.u64()?;
    let total_bytes = d.u64()?;
    let salt = if format == VERSION_FORMAT_SALTED {
        let mut s = [0u8; SALT_LEN];
        s.copy_from_slice(d.take(SALT_LEN)?);
        Some(s)
    } else {
        None
    };
    Ok(VersionObject {
        root,
        parents,
        created_ms,
        message,
        metadata,
        delta,
        file_count,
        total_bytes,
        salt,
    })
}

/// How an object's canonical bytes are stored in the `objects` column family.
pub mod stored {
    use super::*;

    /// Stored uncompressed.
    pub const CODEC_RAW: u8 = 0;
    /// Stored zstd-compressed; a u32 LE uncompressed length follows the codec byte.
    pub const CODEC_ZSTD: u8 = 1;
    /// Encodings shorter than this are never compressed.
    pub const MIN_COMPRESS: usize = 128;
    /// Largest decoded object accepted (guards decompression).
    pub const MAX_OBJECT: usize = 1 << 30;

    /// Wraps canonical bytes for storage, compressing when that helps.
    pub fn wrap(canonical: &[u8], level: i32) -> Vec<u8> {
        if canonical.len() >= MIN_COMPRESS {
            if let Ok(z) = zstd::bulk::compress(canonical, level) {
                if z.len() + 5 < canonical.len() + 1 {
                    let mut out = Vec::with_capacity(z.len() + 5);
                    out.push(CODEC_ZSTD);
                    out.extend_from_slice(&(canonical.len() as u32).to_le_bytes());
                    out.extend_from_slice(&z);
                    return out;
                }
            }
        }
        let mut out = Vec::with_capacity(canonical.len() + 1);
        out.push(CODEC_RAW);
        out.extend_from_slice(canonical);
        out
    }

    /// Recovers canonical bytes.
    pub fn unwrap(value: &[u8], what: &str) -> Result<Vec<u8>> {
        let mut d = Dec::new(value, what);
        match d.u8()? {
            CODEC_RAW => Ok(value.get(1..).unwrap_or_default().to_vec()),
            CODEC_ZSTD => {
                let len = d.u32()? as usize;
                if len > MAX_OBJECT {
                    return Err(d.err(format!("declared size {len} too large")));
                }
                let body = value.get(5..).unwrap_or_default();
                let out = zstd::bulk::decompress(body, len)
                    .map_err(|e| Error::corrupted(what, format!("zstd: {e}")))?;
                if out.len() != len {
                    return Err(Error::corrupted(what, "decompressed length differs"));
                }
                Ok(out)
            }
            other => Err(d.err(format!("unknown object codec {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, size: u64) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            size,
            target: EntryTarget::File(ObjectId(hash(name.as_bytes()))),
        }
    }

    #[test]
    fn objects_round_trip() {
        let file = FileObject {
            size: 5,
            chunks: vec![(ChunkId(hash(b"x")), 2), (ChunkId(hash(b"y")), 3)],
        };
        let leaf = TreeNode::Leaf(vec![
            entry("a", 1),
            Entry {
                name: b"d".to_vec(),
                mode: 0o755,
                size: 10,
                target: EntryTarget::Dir {
                    id: ObjectId(hash(b"d")),
                    file_count: 3,
                },
            },
            Entry {
                name: b"l".to_vec(),
                mode: 0o777,
                size: 3,
                target: EntryTarget::Symlink(b"../x".to_vec()[..3].to_vec()),
            },
        ]);
        let mut metadata = BTreeMap::new();
        metadata.insert("k".to_string(), "v".to_string());
        let version = VersionObject {
            root: ObjectId(hash(b"root")),
            parents: vec![VersionId(hash(b"p"))],
            created_ms: 1234,
            message: "m".into(),
            metadata,
            delta: Delta {
                added: 1,
                ..Default::default()
            },
            file_count: 4,
            total_bytes: 11,
            salt: Some([7; SALT_LEN]),
        };
        let unsalted = VersionObject {
            salt: None,
            ..version.clone()
        };
        for obj in [
            Object::File(file),
            Object::Tree(leaf),
            Object::Version(version),
            Object::Version(unsalted),
        ] {
            let bytes = obj.encode();
            assert_eq!(Object::decode(&bytes, "t").unwrap(), obj);
            let stored = stored::wrap(&bytes, 3);
            assert_eq!(stored::unwrap(&stored, "t").unwrap(), bytes);
        }
    }

    #[test]
    fn decoder_rejects_non_canonical() {
        let leaf = TreeNode::Leaf(vec![entry("b", 1), entry("a", 1)]);
        assert!(matches!(
            Object::decode(&leaf.encode(), "t"),
            Err(Error::Corrupted { .. })
        ));
        let mut bytes = TreeNode::Leaf(vec![entry("a", 1)]).encode();
        bytes.push(0);
        assert!(matches!(
            Object::decode(&bytes, "t"),
            Err(Error::Corrupted { .. })
        ));
        let mut bytes = FileObject::default().encode();
        bytes[1] = 99;
        assert!(matches!(
            Object::decode(&bytes, "t"),
            Err(Error::UnsupportedFormatVersion { .. })
        ));
        let bad = FileObject {
            size: 9,
            chunks: vec![(ChunkId(hash(b"x")), 2)],
        };
        assert!(Object::decode(&bad.encode(), "t").is_err());
    }

    /// A version object exactly as format-1 builds wrote it (the bytes of
    /// `dsv` 0.1.0 for this content, written out by hand from FORMAT.md).
    fn format1_version_bytes() -> Vec<u8> {
        let mut b = vec![TAG_VERSION, 1];
        b.extend_from_slice(&hash(b"root"));
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&hash(b"p"));
        b.extend_from_slice(&1234i64.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b'm');
        b.extend_from_slice(&0u32.to_le_bytes());
        for x in [1u64, 0, 0, 0, 0, 0, 4, 11] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b
    }

    #[test]
    fn format1_versions_decode_and_keep_their_id() {
        let old = format1_version_bytes();
        let Object::Version(v) = Object::decode(&old, "t").unwrap() else {
            panic!("not a version");
        };
        assert_eq!(v.salt, None);
        assert_eq!(v.message, "m");
        assert_eq!(v.file_count, 4);
        // Re-encoding gives the same bytes, so the same id: old versions
        // verify.
        assert_eq!(v.encode(), old);
        assert_eq!(v.id(), VersionId(hash(&old)));
        // A salt is appended to the same payload under object format 2.
        let salted = VersionObject {
            salt: Some([9; SALT_LEN]),
            ..v.clone()
        };
        let new = salted.encode();
        assert_eq!(new[1], VERSION_FORMAT_SALTED);
        assert_eq!(&new[2..old.len()], &old[2..]);
        assert_eq!(&new[old.len()..], &[9; SALT_LEN]);
        assert_ne!(salted.id(), v.id());
    }

    #[test]
    fn salted_versions_are_strict() {
        let old = format1_version_bytes();
        // Format 2 without its salt, or a format-1 version with trailing
        // salt bytes, or a short salt: all refused.
        let mut no_salt = old.clone();
        no_salt[1] = VERSION_FORMAT_SALTED;
        assert!(matches!(
            Object::decode(&no_salt, "t"),
            Err(Error::Corrupted { .. })
        ));
        let mut trailing = old.clone();
        trailing.extend_from_slice(&[0; SALT_LEN]);
        assert!(matches!(
            Object::decode(&trailing, "t"),
            Err(Error::Corrupted { .. })
        ));
        let mut short = no_salt.clone();
        short.extend_from_slice(&[0; SALT_LEN - 1]);
        assert!(Object::decode(&short, "t").is_err());
        // Format 2 exists only for versions; format 3 for nothing.
        let mut file = FileObject::default().encode();
        file[1] = VERSION_FORMAT_SALTED;
        assert!(matches!(
            Object::decode(&file, "t"),
            Err(Error::UnsupportedFormatVersion { .. })
        ));
        let mut v3 = no_salt;
        v3[1] = 3;
        assert!(matches!(
            Object::decode(&v3, "t"),
            Err(Error::UnsupportedFormatVersion { found: 3, .. })
        ));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name(b"ok\xff").is_ok());
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert!(validate_name(bad).is_err());
        }
    }
}
