//! What a repository records about its remotes, in the `app` column family
//! (mirrored in `docs/FORMAT.md`):
//!
//! | key | value |
//! |---|---|
//! | `rm/` · name | [`RemoteRecord`] (JSON) |
//! | `rx/` · name · 0x00 · id [32] | where the remote holds a chunk or object: [`RemoteLoc`] (50 bytes) |
//! | `rp/` · name · 0x00 · pack hash (64 hex) | the pack's size, u64 LE: packs whose index was read |
//! | `rt/` · name · 0x00 · dataset id [16] | the dataset's remote document as last read or written, with its entity tag (JSON) |

use serde::{Deserialize, Serialize};

use dsv::DatasetId;

use crate::error::{Error, Result};

/// Prefix of remote records.
pub const REMOTE: &[u8] = b"rm/";
/// Prefix of the remote index.
pub const REMOTE_INDEX: &[u8] = b"rx/";
/// Prefix of read remote packs.
pub const REMOTE_PACK: &[u8] = b"rp/";
/// Prefix of remote-tracking dataset documents.
pub const REMOTE_TRACKING: &[u8] = b"rt/";

/// A configured remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRecord {
    /// `s3://bucket/prefix`, `gs://…`, `az://…`, `file:///path` or a path.
    pub url: String,
    /// Endpoint of an S3-compatible server (`http://127.0.0.1:9000`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Chunks not downloaded yet are read from this remote on demand (a
    /// clone made without `--full`).
    #[serde(default)]
    pub lazy: bool,
    /// The repository's packs live here (`init --objects`): its local
    /// packs are evicted once pushed, and it cannot be removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub primary: bool,
    /// When it was added, ms.
    pub added_ms: i64,
}

/// Checks a remote name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::Repo(dsv::Error::Invalid(format!(
            "invalid remote name '{name}': 1 to 64 letters, digits, '.', '_' or '-'"
        ))))
    }
}

/// `rm/` key.
pub fn remote(name: &str) -> Vec<u8> {
    [REMOTE, name.as_bytes()].concat()
}

/// Prefix of one remote's keys under `prefix`.
pub fn scoped(prefix: &[u8], name: &str) -> Vec<u8> {
    [prefix, name.as_bytes(), &[0]].concat()
}

/// `rx/` key.
pub fn index_entry(name: &str, id: &[u8; 32]) -> Vec<u8> {
    [&scoped(REMOTE_INDEX, name)[..], id].concat()
}

/// `rp/` key.
pub fn pack(name: &str, hash: &str) -> Vec<u8> {
    [&scoped(REMOTE_PACK, name)[..], hash.as_bytes()].concat()
}

/// `rt/` key.
pub fn tracking(name: &str, ds: &DatasetId) -> Vec<u8> {
    [&scoped(REMOTE_TRACKING, name)[..], &ds.0].concat()
}

/// Where a remote holds a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteLoc {
    /// The pack's hash (its name).
    pub pack: [u8; 32],
    /// Offset of the record header.
    pub offset: u64,
    /// Stored data length.
    pub stored_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// 0 = raw, 1 = zstd.
    pub codec: u8,
    /// 0 = chunk, 1 = object.
    pub kind: u8,
}

impl RemoteLoc {
    /// `pack [32] | offset u64 | stored_len u32 | raw_len u32 | codec u8 | kind u8`, LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(50);
        v.extend_from_slice(&self.pack);
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.stored_len.to_le_bytes());
        v.extend_from_slice(&self.raw_len.to_le_bytes());
        v.push(self.codec);
        v.push(self.kind);
        v
    }
    /// Strict decode.
    pub fn decode(v: &[u8]) -> Result<Self> {
        if v.len() != 50 || v[48] > 1 || v[49] > 1 {
            return Err(Error::Repo(dsv::Error::Store(dsv_store::Error::corrupted(
                "remote index entry",
                format!("{} bytes", v.len()),
            ))));
        }
        Ok(Self {
            pack: v[..32].try_into().expect("32 bytes"),
            offset: u64::from_le_bytes(v[32..40].try_into().expect("8")),
            stored_len: u32::from_le_bytes(v[40..44].try_into().expect("4")),
            raw_len: u32::from_le_bytes(v[44..48].try_into().expect("4")),
            codec: v[48],
            kind: v[49],
        })
    }
    /// The pack's object name on the remote.
    pub fn pack_name(&self) -> String {
        crate::doc::pack_name(&hex::encode(self.pack))
    }
    /// The record's byte range in its pack.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + dsv_store::pack::RECORD_HEADER_LEN + self.stored_len as u64
    }
    /// As a pack index entry (for the record header check).
    pub fn entry(&self, id: [u8; 32]) -> dsv_store::bundle::IndexEntry {
        dsv_store::bundle::IndexEntry {
            kind: if self.kind == 0 {
                dsv_store::bundle::EntryKind::Chunk
            } else {
                dsv_store::bundle::EntryKind::Object
            },
            id,
            offset: self.offset,
            stored_len: self.stored_len,
            raw_len: self.raw_len,
            codec: self.codec,
        }
    }
}
