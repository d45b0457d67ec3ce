//! The porcelain's stored records (JSON values under [`crate::keys`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use dsv_store::{Delta, VersionId};

use crate::error::{Error, Result};

/// A dataset's stable id (16 random bytes); names can change, ids do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetId(pub [u8; 16]);

impl DatasetId {
    /// A fresh id: 16 bytes from the OS random generator (datasets, tasks
    /// and models made on different machines never share an id).
    pub fn random() -> Result<Self> {
        Ok(Self(dsv_store::id::random_bytes()?))
    }
    /// From stored bytes.
    pub fn from_slice(s: &[u8]) -> Option<Self> {
        Some(Self(s.try_into().ok()?))
    }
}

impl fmt::Display for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl FromStr for DatasetId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("invalid dataset id '{s}': 32 hex digits"));
        if s.len() != 32 {
            return Err(bad());
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self(b))
    }
}

impl Serialize for DatasetId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DatasetId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A dataset: a project/name that owns a line of versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// Project (may contain `/` for sub-projects).
    pub project: String,
    /// Name (no `/`).
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// What the porcelain indexes about a finalized version (the immutable
/// facts are copied from the version object so that listings never decode
/// objects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Version string (semantic, or any label).
    pub version: String,
    /// Parent versions.
    pub parents: Vec<VersionId>,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Files.
    pub file_count: u64,
    /// Logical bytes.
    pub total_bytes: u64,
    /// Change against the first parent.
    pub delta: Delta,
    /// Message given at finalize.
    #[serde(default)]
    pub message: String,
    /// Finalize order: the sequence number of the version's
    /// `version_finalized` event (gap-free, monotonic, assigned under the
    /// write lock). `None` for versions indexed by older builds, which rank
    /// below every version that has one, by creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl VersionInfo {
    /// Sort key of finalize order: the newest version has the largest key.
    /// Never the version string: "latest" is the version finalized last.
    pub fn finalize_order(&self) -> (bool, u64, i64) {
        (self.seq.is_some(), self.seq.unwrap_or(0), self.created_ms)
    }
}

/// A version removed from its dataset's line by `delete --force` while
/// tasks or models referenced it: still readable by id (for their
/// lineage), kept by `gc` through a porcelain root, never listed or
/// resolved by name, version string or tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptVersion {
    /// The dataset it belonged to.
    pub dataset: DatasetId,
    /// Its index record as it was.
    pub info: VersionInfo,
    /// When it was deleted, ms.
    pub deleted_ms: i64,
    /// What referenced it then (tasks, models).
    #[serde(default)]
    pub referenced_by: Vec<String>,
}

/// Mutable facts about a version: description and user metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// User metadata, key → any JSON value.
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// A dataset draft: which dataset it belongs to and what finalize applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftInfo {
    /// The dataset.
    pub dataset: DatasetId,
    /// Explicit version string, or `None` for the next patch version.
    #[serde(default)]
    pub version: Option<String>,
    /// Tags the version gets.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Message for the version.
    #[serde(default)]
    pub message: String,
    /// Creation time, ms.
    pub created_ms: i64,
    /// The folder a `watch` feeds this draft from (to resume it).
    #[serde(default)]
    pub watch: Option<String>,
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(v: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| Error::corrupted(what, e))
}

/// Decodes every JSON record under `prefix` in the `app` column family,
/// keeping those `keep` accepts; a record that does not decode is an error
/// naming `what`.
pub(crate) fn scan_json<T: serde::de::DeserializeOwned>(
    kv: &dyn dsv_store::KvRead,
    prefix: &[u8],
    what: &str,
    mut keep: impl FnMut(&T) -> bool,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut err = None;
    kv.scan(dsv_store::Cf::App, prefix, &mut |k, v| {
        // Name the record: its key without the prefix (an id or a name;
        // hex where the key holds binary parts).
        let rest = k.strip_prefix(prefix).unwrap_or(k);
        let key = if rest.iter().all(|b| b.is_ascii_graphic()) {
            String::from_utf8_lossy(rest).into_owned()
        } else {
            rest.iter().map(|b| format!("{b:02x}")).collect()
        };
        match from_json::<T>(v, &format!("{what} {key}")) {
            Ok(t) => {
                if keep(&t) {
                    out.push(t);
                }
            }
            Err(e) => {
                err = Some(e);
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    err.map_or(Ok(out), Err)
}

/// Parses a stored version string as a semantic version (a leading `v` of
/// versions written by older builds is ignored); `None` for other labels.
pub fn semver_of(version: &str) -> Option<semver::Version> {
    semver::Version::parse(version.trim_start_matches('v')).ok()
}

/// Checks a version string given by a user: a semantic version
/// `MAJOR.MINOR.PATCH` (pre-release and build parts allowed).
pub fn check_semver(version: &str) -> Result<semver::Version> {
    semver::Version::parse(version).map_err(|e| {
        Error::Invalid(format!(
            "invalid version '{version}': not a semantic version MAJOR.MINOR.PATCH \
             (e.g. 1.2.0): {e}"
        ))
    })
}

/// Whether `wanted` names the same version as the stored `existing`: the
/// same string, or semantic versions of equal precedence (`1.0.0` and
/// `1.0.0+build`; "highest" must be unambiguous).
pub fn same_version(existing: &str, wanted: &str) -> bool {
    existing == wanted
        || matches!((semver_of(existing), semver_of(wanted)),
            (Some(a), Some(b)) if a.cmp_precedence(&b) == std::cmp::Ordering::Equal)
}

/// The version after `v`: its patch number plus one.
pub fn bump_patch(v: &semver::Version) -> String {
    semver::Version::new(v.major, v.minor, v.patch + 1).to_string()
}
