//! The remote layout's names and documents (specified in `docs/FORMAT.md`):
//!
//! ```text
//! dsv-remote.json                 manifest: {"format": 1, "features": [], "created_ms": …}
//! packs/HASH.pack                 self-describing packs (chunks and objects), named by BLAKE3
//! datasets/DATASET-ID.json        one document per dataset: its header and versions, in order
//! models/MODEL-ID.body            a model's body (written once)
//! models/MODEL-ID.json            its record and the body's BLAKE3 (written once, after the body)
//! ```

use serde::{Deserialize, Serialize};

use dsv::exchange::{DatasetHeader, VersionHeader};
use dsv::DatasetId;

/// The manifest's name.
pub const MANIFEST: &str = "dsv-remote.json";
/// The layout format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Layout features this build knows (none yet).
pub const KNOWN_FEATURES: &[&str] = &[];

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout format.
    pub format: u32,
    /// Layout features in use.
    #[serde(default)]
    pub features: Vec<String>,
    /// When the remote was first written, ms.
    #[serde(default)]
    pub created_ms: i64,
    /// Chunking of the repository that first pushed (a clone uses the same,
    /// so that what it syncs later deduplicates against the remote).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunking: Option<dsv_store::ChunkerParams>,
}

/// One dataset on a remote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetDoc {
    /// Layout format.
    pub format: u32,
    /// The dataset.
    pub dataset: DatasetHeader,
    /// Its versions, oldest first (the order they reached the remote).
    pub versions: Vec<VersionHeader>,
    /// Last written, ms.
    #[serde(default)]
    pub updated_ms: i64,
}

/// A dataset document as last seen, with its entity tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tracking {
    /// Entity tag the remote gave it.
    #[serde(default)]
    pub etag: Option<String>,
    /// The document.
    pub doc: DatasetDoc,
}

/// A pack's object name.
pub fn pack_name(hash: &str) -> String {
    format!("packs/{hash}.pack")
}

/// The pack hash in a pack's object name.
pub fn pack_hash(name: &str) -> Option<&str> {
    let h = name.strip_prefix("packs/")?.strip_suffix(".pack")?;
    (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then_some(h)
}

/// A dataset document's object name.
pub fn dataset_doc(id: &DatasetId) -> String {
    format!("datasets/{id}.json")
}

/// A model on a remote: its record and where its body is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDoc {
    /// Layout format.
    pub format: u32,
    /// The model's record as the pushing repository had it.
    pub model: dsv::Model,
    /// BLAKE3 of the body, 64 hex.
    pub body_blake3: String,
    /// The body's length.
    pub body_len: u64,
}

/// A model document's object name.
pub fn model_doc(id: &str) -> String {
    format!("models/{id}.json")
}

/// A model body's object name.
pub fn model_body(id: &str) -> String {
    format!("models/{id}.body")
}

/// The model id in a model document's name.
pub fn model_id(name: &str) -> Option<&str> {
    let id = name.strip_prefix("models/")?.strip_suffix(".json")?;
    (id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(id)
}
