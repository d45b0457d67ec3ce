//! Self-describing packs (pack format 2): the packs of a remote.
//!
//! A remote holds chunks *and* metadata objects (files, trees, versions) in
//! packs, and each pack ends with an index of what it holds, so a bucket
//! alone is enough to rebuild a repository. The records are those of
//! format-1 packs (`codec u8 | raw_len u32 | stored_len u32 | id [32] |
//! data`), after the same 16-byte header with format 2; then the index and
//! a fixed trailer:
//!
//! ```text
//! header   "DSVPACK\0" | format u32 = 2 | reserved u32
//! records  codec u8 | raw_len u32 | stored_len u32 | id [32] | data   (repeated)
//! index    kind u8 | id [32] | offset u64 | stored_len u32 | raw_len u32 | codec u8   (50 bytes each)
//! trailer  index offset u64 | entry count u32 | reserved u32 | BLAKE3(index) [32] | "DSVPIDX\0"
//! ```
//!
//! A pack is named by the BLAKE3 hash of its bytes (`packs/HEX.pack`), so
//! an upload is idempotent and a whole-pack download checks itself; a
//! ranged read of one record checks the record header against the index
//! and the data against the record's id. `docs/FORMAT.md` is the spec.

use crate::codec::{Dec, Enc};
use crate::error::{Error, Result};
use crate::pack::{PACK_HEADER_LEN, PACK_MAGIC, RECORD_HEADER_LEN};

/// Format of self-describing packs.
pub const BUNDLE_FORMAT: u32 = 2;
/// Trailer magic.
pub const INDEX_MAGIC: &[u8; 8] = b"DSVPIDX\0";
/// Trailer length.
pub const TRAILER_LEN: u64 = 56;
/// One index entry's length.
pub const ENTRY_LEN: usize = 50;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    /// A chunk of file data (id = BLAKE3 of the raw bytes).
    Chunk,
    /// A metadata object's canonical encoding (id = its object id).
    Object,
}

impl EntryKind {
    fn code(self) -> u8 {
        match self {
            EntryKind::Chunk => 0,
            EntryKind::Object => 1,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(EntryKind::Chunk),
            1 => Some(EntryKind::Object),
            _ => None,
        }
    }
}

/// One index entry: where a record is in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Chunk or object.
    pub kind: EntryKind,
    /// Its id.
    pub id: [u8; 32],
    /// Offset of the record header.
    pub offset: u64,
    /// Stored data length.
    pub stored_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// 0 = raw, 1 = zstd.
    pub codec: u8,
}

impl IndexEntry {
    /// The byte range of the whole record (header and data).
    pub fn record_range(&self) -> std::ops::Range<u64> {
        self.offset
            ..self
                .offset
                .saturating_add(RECORD_HEADER_LEN + self.stored_len as u64)
    }

    fn encode_into(&self, e: &mut Enc) {
        e.u8(self.kind.code())
            .raw(&self.id)
            .u64(self.offset)
            .u32(self.stored_len)
            .u32(self.raw_len)
            .u8(self.codec);
    }
}

/// Builds one pack in memory.
#[derive(Debug)]
pub struct BundleBuilder {
    buf: Vec<u8>,
    entries: Vec<IndexEntry>,
}

impl Default for BundleBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A finished pack.
#[derive(Debug)]
pub struct Bundle {
    /// Hex BLAKE3 of `bytes`: the pack's name without folder and suffix.
    pub hash: String,
    /// The pack.
    pub bytes: Vec<u8>,
    /// Its index.
    pub entries: Vec<IndexEntry>,
}

impl BundleBuilder {
    /// An empty pack.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&BUNDLE_FORMAT.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        Self {
            buf,
            entries: Vec::new(),
        }
    }

    /// Appends a record.
    pub fn add(&mut self, kind: EntryKind, id: [u8; 32], codec: u8, raw_len: u32, stored: &[u8]) {
        let offset = self.buf.len() as u64;
        self.buf.push(codec);
        self.buf.extend_from_slice(&raw_len.to_le_bytes());
        self.buf
            .extend_from_slice(&(stored.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&id);
        self.buf.extend_from_slice(stored);
        self.entries.push(IndexEntry {
            kind,
            id,
            offset,
            stored_len: stored.len() as u32,
            raw_len,
            codec,
        });
    }

    /// Bytes so far.
    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends the index and trailer; names the pack.
    pub fn finish(mut self) -> Bundle {
        let index_offset = self.buf.len() as u64;
        let mut e = Enc::with_capacity(self.entries.len() * ENTRY_LEN);
        for ent in &self.entries {
            ent.encode_into(&mut e);
        }
        let index = e.buf;
        let hash = blake3::hash(&index);
        self.buf.extend_from_slice(&index);
        self.buf.extend_from_slice(&index_offset.to_le_bytes());
        self.buf
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&0u32.to_le_bytes());
        self.buf.extend_from_slice(hash.as_bytes());
        self.buf.extend_from_slice(INDEX_MAGIC);
        Bundle {
            hash: blake3::hash(&self.buf).to_hex().to_string(),
            bytes: self.buf,
            entries: self.entries,
        }
    }
}

/// Where a pack's index is, read from its trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Offset of the index.
    pub index_offset: u64,
    /// Entries.
    pub count: u32,
    /// BLAKE3 of the index bytes.
    pub index_hash: [u8; 32],
}

/// Parses the trailer at the end of `tail` (the last bytes of a pack of
/// `size` bytes). `what` names the pack in errors.
pub fn parse_trailer(tail: &[u8], size: u64, what: &str) -> Result<Trailer> {
    let bad = |why: String| Err(Error::corrupted(what, why));
    if (tail.len() as u64) < TRAILER_LEN || size < PACK_HEADER_LEN + TRAILER_LEN {
        return bad("too short for a pack trailer".into());
    }
    let t = &tail[tail.len() - TRAILER_LEN as usize..];
    if &t[48..56] != INDEX_MAGIC {
        return bad("no pack index trailer (not a remote pack, or truncated)".into());
    }
    let mut d = Dec::new(&t[..48], what);
    let index_offset = d.u64()?;
    let count = d.u32()?;
    let _reserved = d.u32()?;
    let index_hash: [u8; 32] = d.id()?;
    let index_end = size - TRAILER_LEN;
    if index_offset < PACK_HEADER_LEN
        || index_offset > index_end
        || index_end - index_offset != count as u64 * ENTRY_LEN as u64
    {
        return bad(format!(
            "index of {count} entries at offset {index_offset} does not fit a pack of {size} bytes"
        ));
    }
    Ok(Trailer {
        index_offset,
        count,
        index_hash,
    })
}

/// Parses and checks a pack's index bytes against its trailer.
pub fn parse_index(index: &[u8], t: &Trailer, what: &str) -> Result<Vec<IndexEntry>> {
    if index.len() != t.count as usize * ENTRY_LEN {
        return Err(Error::corrupted(
            what,
            "index length disagrees with its trailer",
        ));
    }
    if blake3::hash(index).as_bytes() != &t.index_hash {
        return Err(Error::corrupted(what, "index does not match its checksum"));
    }
    let mut d = Dec::new(index, what);
    let mut out = Vec::with_capacity(t.count as usize);
    for _ in 0..t.count {
        let code = d.u8()?;
        let kind = EntryKind::from_code(code)
            .ok_or_else(|| Error::corrupted(what, format!("unknown entry kind {code}")))?;
        let ent = IndexEntry {
            kind,
            id: d.id()?,
            offset: d.u64()?,
            stored_len: d.u32()?,
            raw_len: d.u32()?,
            codec: d.u8()?,
        };
        if ent.codec > 1 {
            return Err(Error::corrupted(
                what,
                format!("unknown codec {}", ent.codec),
            ));
        }
        let end = ent
            .offset
            .checked_add(RECORD_HEADER_LEN + ent.stored_len as u64);
        if ent.offset < PACK_HEADER_LEN || end.is_none_or(|e| e > t.index_offset) {
            return Err(Error::corrupted(
                what,
                format!("entry at offset {} lies outside the records", ent.offset),
            ));
        }
        out.push(ent);
    }
    d.finish()?;
    Ok(out)
}

/// Checks a pack's header (magic and format 2).
pub fn check_header(head: &[u8], what: &str) -> Result<()> {
    if head.len() < PACK_HEADER_LEN as usize || &head[..8] != PACK_MAGIC {
        return Err(Error::corrupted(what, "not a dsv pack (bad magic)"));
    }
    let fmt = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if fmt != BUNDLE_FORMAT {
        return Err(Error::UnsupportedFormatVersion {
            what: what.to_string(),
            found: fmt,
            supported: BUNDLE_FORMAT,
        });
    }
    Ok(())
}

/// Takes the data out of a record read by its index entry, checking the
/// record header against the entry. The caller checks the data's hash.
pub fn record_data(record: Vec<u8>, ent: &IndexEntry, what: &str) -> Result<Vec<u8>> {
    let h = RECORD_HEADER_LEN as usize;
    let ok = record.len() == h + ent.stored_len as usize
        && record[0] == ent.codec
        && record[1..5] == ent.raw_len.to_le_bytes()
        && record[5..9] == ent.stored_len.to_le_bytes()
        && record[9..41] == ent.id;
    if !ok {
        return Err(Error::corrupted(
            what,
            format!(
                "record at offset {} disagrees with the pack's index",
                ent.offset
            ),
        ));
    }
    let mut record = record;
    record.drain(..h);
    Ok(record)
}

/// Parses a whole pack: header, index, and every record checked against it.
pub fn parse_whole(bytes: &[u8], what: &str) -> Result<Vec<IndexEntry>> {
    check_header(bytes, what)?;
    let size = bytes.len() as u64;
    let t = parse_trailer(bytes, size, what)?;
    let index = &bytes[t.index_offset as usize..(size - TRAILER_LEN) as usize];
    let entries = parse_index(index, &t, what)?;
    for e in &entries {
        let r = e.record_range();
        record_data(bytes[r.start as usize..r.end as usize].to_vec(), e, what)?;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_is_named() {
        let mut b = BundleBuilder::new();
        b.add(EntryKind::Chunk, [1; 32], 0, 3, b"abc");
        b.add(EntryKind::Object, [2; 32], 1, 10, b"zz");
        let p = b.finish();
        assert_eq!(p.hash, blake3::hash(&p.bytes).to_hex().to_string());
        let ents = parse_whole(&p.bytes, "pack x").unwrap();
        assert_eq!(ents, p.entries);
        let e = &ents[0];
        let r = e.record_range();
        let data = record_data(p.bytes[r.start as usize..r.end as usize].to_vec(), e, "x").unwrap();
        assert_eq!(data, b"abc");
        // A flipped index byte is caught by the index checksum.
        let mut bad = p.bytes.clone();
        let t = parse_trailer(&bad, bad.len() as u64, "x").unwrap();
        bad[t.index_offset as usize + 3] ^= 1;
        let err = parse_whole(&bad, "pack x").unwrap_err().to_string();
        assert!(err.contains("pack x") && err.contains("checksum"), "{err}");
        // A truncated pack has no trailer.
        let err = parse_whole(&p.bytes[..p.bytes.len() - 1], "pack y")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pack y"), "{err}");
        // A record whose header was damaged is refused by its entry.
        let mut bad = p.bytes.clone();
        bad[e.offset as usize + 12] ^= 1;
        assert!(parse_whole(&bad, "pack z").is_err());
    }
}
