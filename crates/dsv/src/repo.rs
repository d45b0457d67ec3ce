//! [`Repo`]: datasets over the engine. Every mutation is one atomic engine
//! write that also appends its events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Serialize;

use dsv_store::kv::Batch;
use dsv_store::store::{add_tag_batch, remove_tag_batch, tags_of_in};
use dsv_store::tree::{walk_files, KvObjects, ObjectRead};
use dsv_store::{
    Cf, Change, Delta, Diff, DraftId, Entry, EntryTarget, IngestOptions, KvRead, NoProgress,
    Progress, RepoConfig, StageMode, Store, StoreOptions, VersionId,
};

use crate::error::{Error, Parked, Result};
use crate::events::{Event, EventKind, EventWriter};
use crate::keys;
use crate::records::{
    bump_patch, check_semver, from_json, same_version, semver_of, to_json, DatasetId,
    DatasetRecord, DraftInfo, KeptVersion, VersionInfo, VersionMeta,
};
use crate::rev::{parse_dataset_name, RevSpec};

/// Version-object metadata key holding the owning dataset's id.
pub const META_DATASET: &str = "dsv.dataset";

/// A repository with dataset semantics.
#[derive(Debug)]
pub struct Repo {
    store: Store,
}

/// A dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dataset {
    /// Stable id.
    pub id: DatasetId,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// Creation time, ms.
    pub created_ms: i64,
}

impl Dataset {
    /// `project/name`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.project, self.name)
    }
}

/// A finalized version of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetVersion {
    /// Version id.
    pub id: VersionId,
    /// The dataset.
    pub dataset: Dataset,
    /// Version string.
    pub version: String,
    /// Parents.
    pub parents: Vec<VersionId>,
    /// Tags.
    pub tags: Vec<String>,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Files.
    pub file_count: u64,
    /// Logical bytes.
    pub total_bytes: u64,
    /// Change against the first parent.
    pub delta: Delta,
    /// Message.
    pub message: String,
    /// Description.
    pub description: String,
    /// User metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Finalize order (see [`VersionInfo::seq`]); `None` for versions
    /// indexed by older builds.
    pub seq: Option<u64>,
    /// Removed from its dataset by `delete --force` and kept (readable by
    /// id only) because tasks or models reference it.
    pub deleted: bool,
}

impl DatasetVersion {
    /// `project/name@version (short id)`, for messages.
    pub fn label(&self) -> String {
        format!(
            "{}@{} ({})",
            self.dataset.full_name(),
            self.version,
            &self.id.to_hex()[..12]
        )
    }
}

/// A writable draft of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftHandle {
    /// Draft id.
    pub id: DraftId,
    /// The dataset.
    pub dataset: Dataset,
    /// Parents the draft started from.
    pub parents: Vec<VersionId>,
    /// What finalize applies.
    pub info: DraftInfo,
    /// Files in the draft now.
    pub file_count: u64,
    /// Bytes in the draft now.
    pub total_bytes: u64,
}

/// Options of [`Repo::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Parents (their trees merged, later parents winning per path).
    pub parents: Vec<VersionId>,
    /// Explicit version string (a semantic version the dataset does not
    /// have yet); default: next patch of the dataset's highest.
    pub version: Option<String>,
    /// Tags the version gets at finalize.
    pub tags: Vec<String>,
    /// Message.
    pub message: String,
    /// Create the dataset when missing.
    pub auto_create: bool,
    /// Mark the draft as fed by `watch` from this folder, in the same write
    /// that creates it (a restarted watch resumes it).
    pub watch: Option<String>,
}

/// ClearML-style lookup ([`Repo::get`]).
#[derive(Debug, Clone, Default)]
pub struct GetQuery {
    /// Version id or unique prefix.
    pub id: Option<String>,
    /// Project.
    pub project: Option<String>,
    /// Name.
    pub name: Option<String>,
    /// Version string.
    pub version: Option<String>,
    /// Tags the version must all carry.
    pub tags: Vec<String>,
    /// Only finalized versions (otherwise a newer open draft of the dataset
    /// is returned when one exists).
    pub only_finalized: bool,
    /// Create the dataset (as an empty draft) when nothing matches.
    pub auto_create: bool,
    /// Return a new draft whose parent is the version found.
    pub writable_copy: bool,
}

/// What [`Repo::resolve_any`] found.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A finalized version; `from_draft` when the spec was the id of the
    /// draft it was finalized from.
    Version {
        /// The version.
        version: Box<DatasetVersion>,
        /// The draft id that was given.
        from_draft: Option<DraftId>,
    },
    /// An open draft.
    Draft(Box<DraftHandle>),
}

/// What [`Repo::get`] found.
#[derive(Debug, Clone)]
pub enum Got {
    /// A finalized version.
    Version(Box<DatasetVersion>),
    /// A draft (open, auto-created or a writable copy).
    Draft(Box<DraftHandle>),
}

/// Options of [`Repo::add`].
#[derive(Default)]
pub struct AddOptions<'a> {
    /// Folder inside the dataset (`""` = root).
    pub dataset_path: String,
    /// Only files matching one of these globs (against the path relative
    /// to the added folder, or the file name).
    pub wildcards: Vec<String>,
    /// Do not descend into sub-folders.
    pub non_recursive: bool,
    /// Progress (bytes).
    pub progress: Option<&'a dyn Progress>,
}

/// What an add or sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AddReport {
    /// New paths.
    pub added: Vec<String>,
    /// Changed paths.
    pub modified: Vec<String>,
    /// Removed paths (sync only).
    pub removed: Vec<String>,
    /// Moved paths `(from, to)`.
    pub renamed: Vec<(String, String)>,
    /// Files looked at that did not change.
    pub unchanged: u64,
    /// Bytes of the files looked at.
    pub bytes: u64,
    /// Bytes read and hashed (the rest came from the stat cache).
    pub bytes_hashed: u64,
    /// Bytes newly stored.
    pub stored_bytes: u64,
}

/// Options of [`Repo::sync`].
#[derive(Default)]
pub struct SyncOptions<'a> {
    /// Folder inside the dataset the folder maps to.
    pub dataset_path: String,
    /// Tags for the new version.
    pub tags: Vec<String>,
    /// Message.
    pub message: String,
    /// Explicit version string.
    pub version: Option<String>,
    /// Progress (bytes).
    pub progress: Option<&'a dyn Progress>,
}

/// What [`Repo::sync`] did.
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    /// The new version, or `None` when the folder matched the latest.
    pub version: Option<DatasetVersion>,
    /// The latest version when nothing changed.
    pub unchanged_from: Option<VersionId>,
    /// What changed.
    pub report: AddReport,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileItem {
    /// Path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// File object id (content hash), or the link target for a symlink.
    pub hash: String,
    /// Permission bits.
    pub mode: u32,
    /// Whether it is a symbolic link.
    pub symlink: bool,
}

/// What changed between two versions, with paths as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// New files.
    pub added: Vec<FileItem>,
    /// Changed files (new state).
    pub modified: Vec<FileItem>,
    /// Gone files (old state).
    pub removed: Vec<FileItem>,
    /// Moves.
    pub renamed: Vec<(String, String)>,
}

/// A file whose stored bytes failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyMismatch {
    /// Path in the version.
    pub path: String,
    /// What failed.
    pub error: String,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn item(path: &[u8], e: &Entry) -> FileItem {
    let (hash, symlink) = match &e.target {
        EntryTarget::File(id) => (id.to_hex(), false),
        EntryTarget::Symlink(t) => (lossy(t), true),
        EntryTarget::Dir { id, .. } => (id.to_hex(), false),
    };
    FileItem {
        path: lossy(path),
        size: e.size,
        hash,
        mode: e.mode,
        symlink,
    }
}

fn changes_of(d: &Diff) -> Changes {
    Changes {
        added: d.added.iter().map(|p| item(&p.path, &p.entry)).collect(),
        modified: d.modified.iter().map(|m| item(&m.path, &m.new)).collect(),
        removed: d.removed.iter().map(|p| item(&p.path, &p.entry)).collect(),
        renamed: d
            .renamed
            .iter()
            .map(|r| (lossy(&r.from), lossy(&r.to)))
            .collect(),
    }
}

fn report_of(s: &dsv_store::StageReport) -> AddReport {
    let d = &s.diff;
    let changed = (d.added.len() + d.modified.len() + d.renamed.len()) as u64;
    AddReport {
        added: d.added.iter().map(|p| lossy(&p.path)).collect(),
        modified: d.modified.iter().map(|m| lossy(&m.path)).collect(),
        removed: d.removed.iter().map(|p| lossy(&p.path)).collect(),
        renamed: d
            .renamed
            .iter()
            .map(|r| (lossy(&r.from), lossy(&r.to)))
            .collect(),
        unchanged: s.files_scanned.saturating_sub(changed),
        bytes: s.bytes_scanned,
        bytes_hashed: s.bytes_hashed,
        stored_bytes: s.stored_bytes,
    }
}

/// Glob patterns over paths in a dataset: a pattern matches a file's whole
/// path or its name (`*.csv` matches `days/d1.csv`); `*` crosses `/`.
#[derive(Debug, Clone)]
pub struct PathPattern(GlobSet);

impl PathPattern {
    /// Compiles `patterns`; `None` when there are none (everything matches).
    pub fn new(patterns: &[String]) -> Result<Option<PathPattern>> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(Glob::new(p).map_err(|e| Error::Invalid(format!("invalid pattern '{p}': {e}")))?);
        }
        Ok(Some(PathPattern(
            b.build().map_err(|e| Error::Invalid(e.to_string()))?,
        )))
    }

    /// Whether `path` (or its last component) matches any pattern.
    pub fn matches(&self, path: &[u8]) -> bool {
        let s = lossy(path);
        let name = s.rsplit('/').next().unwrap_or(&s);
        self.0.is_match(&s) || self.0.is_match(name)
    }
}

pub(crate) fn dataset_version(
    dataset: Dataset,
    id: VersionId,
    info: VersionInfo,
    tags: Vec<String>,
    meta: VersionMeta,
) -> DatasetVersion {
    DatasetVersion {
        id,
        dataset,
        seq: info.seq,
        deleted: false,
        version: info.version,
        parents: info.parents,
        tags,
        created_ms: info.created_ms,
        file_count: info.file_count,
        total_bytes: info.total_bytes,
        delta: info.delta,
        message: info.message,
        description: meta.description,
        metadata: meta.metadata,
    }
}

// ---- record access on a KV handle ---------------------------------------

pub(crate) fn dataset_in(kv: &dyn KvRead, id: &DatasetId) -> Result<Dataset> {
    let v = kv
        .get(Cf::App, &keys::dataset(id))?
        .ok_or_else(|| Error::corrupted(format!("dataset {id}"), "record missing"))?;
    let r: DatasetRecord = from_json(&v, &format!("dataset {id}"))?;
    Ok(Dataset {
        id: *id,
        project: r.project,
        name: r.name,
        created_ms: r.created_ms,
    })
}

pub(crate) fn dataset_by_name_in(
    kv: &dyn KvRead,
    project: &str,
    name: &str,
) -> Result<Option<Dataset>> {
    match kv.get(Cf::App, &keys::dataset_name(project, name))? {
        None => Ok(None),
        Some(v) => {
            let id = DatasetId::from_slice(&v)
                .ok_or_else(|| Error::corrupted(format!("name {project}/{name}"), "bad id"))?;
            Ok(Some(dataset_in(kv, &id)?))
        }
    }
}

/// Every version of a dataset as (id, info), oldest first.
pub(crate) fn versions_in(
    kv: &dyn KvRead,
    ds: &DatasetId,
) -> Result<Vec<(VersionId, VersionInfo)>> {
    let prefix = keys::dataset_versions(ds);
    let mut out = Vec::new();
    let mut err = None;
    kv.scan(Cf::App, &prefix, &mut |k, v| {
        let id = VersionId::from_slice(&k[prefix.len() + 8..]);
        match (id, from_json::<VersionInfo>(v, "version index")) {
            (Some(id), Ok(info)) => out.push((id, info)),
            (_, Err(e)) => {
                err = Some(e);
                return Ok(false);
            }
            (None, _) => {}
        }
        Ok(true)
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Up to `n` versions of a dataset that `keep` accepts, newest first in
/// finalize order: from the [`keys::VERSION_ORDER`] index when it is
/// complete (reading only what is returned), else from every version.
pub(crate) fn newest_versions_in(
    kv: &dyn KvRead,
    ds: &DatasetId,
    n: usize,
    keep: &mut dyn FnMut(&VersionId, &VersionInfo) -> Result<bool>,
) -> Result<Vec<(VersionId, VersionInfo)>> {
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    if kv.get(Cf::App, keys::VERSION_ORDER_COMPLETE)?.is_none() {
        let mut vs = versions_in(kv, ds)?;
        sort_newest_first(&mut vs);
        for (id, info) in vs {
            if keep(&id, &info)? {
                out.push((id, info));
                if out.len() == n {
                    break;
                }
            }
        }
        return Ok(out);
    }
    let prefix = keys::version_orders(ds);
    let mut err = None;
    kv.scan_rev(Cf::App, &prefix, b"", &mut |k, _| {
        let rest = &k[prefix.len()..];
        let found = (|| -> Result<Option<(VersionId, VersionInfo)>> {
            let (Some(created), Some(id)) = (
                rest.get(9..17)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes),
                rest.get(17..).and_then(VersionId::from_slice),
            ) else {
                return Err(Error::corrupted("version order index", "bad key"));
            };
            let Some(v) = kv.get(Cf::App, &keys::dataset_version(ds, created as i64, &id))? else {
                return Err(Error::corrupted(
                    format!("version order index of {id}"),
                    "its version entry is missing",
                ));
            };
            Ok(Some((id, from_json::<VersionInfo>(&v, "version index")?)))
        })();
        match found {
            Ok(Some((id, info))) => match keep(&id, &info) {
                Ok(true) => out.push((id, info)),
                Ok(false) => {}
                Err(e) => {
                    err = Some(e);
                    return Ok(false);
                }
            },
            Ok(None) => {}
            Err(e) => {
                err = Some(e);
                return Ok(false);
            }
        }
        Ok(out.len() < n)
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// The dataset's newest version in finalize order.
pub(crate) fn newest_in(
    kv: &dyn KvRead,
    ds: &DatasetId,
) -> Result<Option<(VersionId, VersionInfo)>> {
    Ok(newest_versions_in(kv, ds, 1, &mut |_, _| Ok(true))?.pop())
}

/// The puts that give every version its [`keys::VERSION_ORDER`] and
/// [`keys::VERSION_NAME`] entries and mark each index complete, in one read
/// of every version (idempotent; only the incomplete indexes; empty when
/// both are complete).
pub(crate) fn backfill_version_indexes(kv: &dyn KvRead) -> Result<Batch> {
    let mut b = Batch::default();
    let order = kv.get(Cf::App, keys::VERSION_ORDER_COMPLETE)?.is_none();
    let names = !names_complete(kv)?;
    if !order && !names {
        return Ok(b);
    }
    let mut ids = Vec::new();
    kv.scan(Cf::App, keys::DATASET, &mut |k, _| {
        ids.extend(DatasetId::from_slice(&k[keys::DATASET.len()..]));
        Ok(true)
    })?;
    for ds in ids {
        for (id, info) in versions_in(kv, &ds)? {
            if order {
                b.put(
                    Cf::App,
                    keys::version_order(&ds, info.seq, info.created_ms, &id),
                    Vec::new(),
                );
            }
            if names {
                b.put(
                    Cf::App,
                    keys::version_name(&ds, &info.version, &id),
                    Vec::new(),
                );
            }
        }
    }
    if order {
        b.put(Cf::App, keys::VERSION_ORDER_COMPLETE, Vec::new());
    }
    if names {
        b.put(Cf::App, keys::VERSION_NAMES_COMPLETE, Vec::new());
    }
    Ok(b)
}

/// Versions of several datasets newest first in finalize order (event
/// sequence numbers are global), at most `limit`.
fn merge_newest_first(mut out: Vec<DatasetVersion>, limit: Option<usize>) -> Vec<DatasetVersion> {
    out.sort_by_key(|v| {
        std::cmp::Reverse((v.seq.is_some(), v.seq.unwrap_or(0), v.created_ms, v.id))
    });
    if let Some(n) = limit {
        out.truncate(n);
    }
    out
}

/// Sorts versions newest first in finalize order (ties: by id).
fn sort_newest_first(vs: &mut [(VersionId, VersionInfo)]) {
    vs.sort_by(|a, b| {
        (b.1.finalize_order(), b.0.as_bytes()).cmp(&(a.1.finalize_order(), a.0.as_bytes()))
    });
}

/// The version finalized last (never the highest version string: a
/// version created with a lower `--version` is still the newest).
fn newest<'a>(
    vs: impl Iterator<Item = &'a (VersionId, VersionInfo)>,
) -> Option<&'a (VersionId, VersionInfo)> {
    vs.max_by(|a, b| {
        (a.1.finalize_order(), a.0.as_bytes()).cmp(&(b.1.finalize_order(), b.0.as_bytes()))
    })
}

/// Whether `v` is its dataset's latest version (in `kv`).
pub(crate) fn is_latest_in(kv: &dyn KvRead, v: &DatasetVersion) -> Result<bool> {
    Ok(newest_in(kv, &v.dataset.id)?.is_some_and(|(id, _)| id == v.id))
}

/// One version's index entry, found from its id (`None` when `id` is not a
/// version of `ds`).
pub(crate) fn version_info_in(
    kv: &dyn KvRead,
    ds: &DatasetId,
    id: &VersionId,
) -> Result<Option<VersionInfo>> {
    match version_dataset_in(kv, id)? {
        Some((d, created)) if &d == ds => {
            match kv.get(Cf::App, &keys::dataset_version(ds, created, id))? {
                Some(v) => Ok(Some(from_json(&v, "version index")?)),
                None => Err(Error::corrupted(
                    format!("version index {id}"),
                    "entry missing",
                )),
            }
        }
        _ => Ok(None),
    }
}

fn names_complete(kv: &dyn KvRead) -> Result<bool> {
    Ok(kv.get(Cf::App, keys::VERSION_NAMES_COMPLETE)?.is_some())
}

/// The versions of `ds` whose version string names the same version as
/// `version` ([`same_version`]): from the [`keys::VERSION_NAME`] index when
/// it is complete (a few keys), else from every version.
pub(crate) fn versions_named_in(
    kv: &dyn KvRead,
    ds: &DatasetId,
    version: &str,
) -> Result<Vec<(VersionId, VersionInfo)>> {
    if !names_complete(kv)? {
        return Ok(versions_in(kv, ds)?
            .into_iter()
            .filter(|(_, i)| same_version(&i.version, version))
            .collect());
    }
    let prefix = keys::version_names(ds, &keys::version_name_key(version));
    let mut ids = Vec::new();
    kv.scan(Cf::App, &prefix, &mut |k, _| {
        // Longer keys are other pre-releases of the same major.minor.patch.
        if k.len() == prefix.len() + 32 {
            ids.extend(VersionId::from_slice(&k[prefix.len()..]));
        }
        Ok(true)
    })?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match version_info_in(kv, ds, &id)? {
            Some(info) => out.push((id, info)),
            None => {
                return Err(Error::corrupted(
                    format!("version name index of {id}"),
                    "its version entry is missing",
                ))
            }
        }
    }
    Ok(out)
}

/// The version string a new version of `ds` gets when none is given:
/// [`next_version`], reading only the highest name key when the index is
/// complete.
pub(crate) fn next_version_in(kv: &dyn KvRead, ds: &DatasetId) -> Result<String> {
    if !names_complete(kv)? {
        return Ok(next_version(&versions_in(kv, ds)?));
    }
    let prefix = keys::version_names(ds, &[1u8]);
    match kv.last(Cf::App, &prefix)? {
        None => Ok("1.0.0".to_string()),
        Some((k, _)) => {
            let n = |i: usize| {
                k.get(prefix.len() + 8 * i..prefix.len() + 8 * (i + 1))
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
            };
            match (n(0), n(1), n(2)) {
                (Some(major), Some(minor), Some(patch)) => {
                    Ok(bump_patch(&semver::Version::new(major, minor, patch)))
                }
                _ => Err(Error::corrupted("version name index", "bad key")),
            }
        }
    }
}

/// Refuses `wanted` when `ds` already has that version.
fn check_version_free_in(kv: &dyn KvRead, ds: &Dataset, wanted: &str) -> Result<()> {
    check_version_free(ds, &versions_named_in(kv, &ds.id, wanted)?, wanted)
}

/// The next patch above the dataset's highest semantic version (so an
/// assigned number never collides with an explicit one); `1.0.0` first.
pub(crate) fn next_version(vs: &[(VersionId, VersionInfo)]) -> String {
    vs.iter()
        .filter_map(|(_, i)| semver_of(&i.version))
        .max()
        .map(|v| bump_patch(&v))
        .unwrap_or_else(|| "1.0.0".to_string())
}

/// Refuses `wanted` when the dataset already has that version.
fn check_version_free(ds: &Dataset, vs: &[(VersionId, VersionInfo)], wanted: &str) -> Result<()> {
    match vs.iter().find(|(_, i)| same_version(&i.version, wanted)) {
        Some((_, i)) => Err(Error::VersionExists {
            dataset: ds.full_name(),
            version: if i.version == wanted {
                wanted.to_string()
            } else {
                format!("{wanted} (as {})", i.version)
            },
        }),
        None => Ok(()),
    }
}

pub(crate) fn version_meta_in(kv: &dyn KvRead, id: &VersionId) -> Result<VersionMeta> {
    match kv.get(Cf::App, &keys::version_meta(id))? {
        None => Ok(VersionMeta::default()),
        Some(v) => from_json(&v, &format!("metadata of {id}")),
    }
}

fn version_dataset_in(kv: &dyn KvRead, id: &VersionId) -> Result<Option<(DatasetId, i64)>> {
    match kv.get(Cf::App, &keys::version_index(id))? {
        None => Ok(None),
        Some(v) if v.len() == 24 => {
            let ds = DatasetId::from_slice(&v[..16]).expect("16 bytes");
            let created = u64::from_be_bytes(v[16..24].try_into().expect("8 bytes")) as i64;
            Ok(Some((ds, created)))
        }
        Some(_) => Err(Error::corrupted(
            format!("version index {id}"),
            "bad length",
        )),
    }
}

fn kept_in(kv: &dyn KvRead, id: &VersionId) -> Result<Option<KeptVersion>> {
    match kv.get(Cf::App, &keys::kept_version(id))? {
        None => Ok(None),
        Some(v) => Ok(Some(from_json(&v, &format!("kept version {id}"))?)),
    }
}

fn draft_info_in(kv: &dyn KvRead, id: &DraftId) -> Result<Option<DraftInfo>> {
    match kv.get(Cf::App, &keys::draft(id))? {
        None => Ok(None),
        Some(v) => Ok(Some(from_json(&v, &format!("draft {id}"))?)),
    }
}

/// A version string given by a user: a semantic version of at most 100
/// characters.
fn check_version_string(v: &str) -> Result<()> {
    if v.len() > 100 {
        return Err(Error::Invalid(format!(
            "invalid version '{v}': longer than 100 characters"
        )));
    }
    // A semantic version has no white space, '/', '@' or control
    // characters: the parser refuses them, naming the string.
    check_semver(v).map(|_| ())
}

/// Writes the index records of a new version of `ds`; `seq` is the
/// sequence number of its `version_finalized` event (its finalize order).
pub(crate) fn index_version_batch(
    b: &mut Batch,
    ds: &DatasetId,
    v: &dsv_store::Version,
    version: &str,
    seq: u64,
) {
    let o = &v.object;
    let info = VersionInfo {
        seq: Some(seq),
        version: version.to_string(),
        parents: o.parents.clone(),
        created_ms: o.created_ms,
        file_count: o.file_count,
        total_bytes: o.total_bytes,
        delta: o.delta,
        message: o.message.clone(),
    };
    b.put(
        Cf::App,
        keys::dataset_version(ds, o.created_ms, &v.id),
        to_json(&info),
    );
    b.put(
        Cf::App,
        keys::version_order(ds, info.seq, info.created_ms, &v.id),
        Vec::new(),
    );
    b.put(Cf::App, keys::version_name(ds, version, &v.id), Vec::new());
    let mut idx = ds.0.to_vec();
    idx.extend_from_slice(&(o.created_ms.max(0) as u64).to_be_bytes());
    b.put(Cf::App, keys::version_index(&v.id), idx);
}

fn new_dataset_batch(
    b: &mut Batch,
    ev: &mut EventWriter,
    id: DatasetId,
    project: &str,
    name: &str,
) -> Dataset {
    let created_ms = dsv_store::store::now_ms();
    let rec = DatasetRecord {
        project: project.to_string(),
        name: name.to_string(),
        created_ms,
        description: String::new(),
    };
    b.put(Cf::App, keys::dataset(&id), to_json(&rec));
    b.put(Cf::App, keys::dataset_name(project, name), id.0.to_vec());
    let mut e = Event::new(EventKind::DatasetCreated);
    e.dataset = Some(id.to_string());
    e.project = project.to_string();
    e.name = name.to_string();
    ev.push(b, e);
    Dataset {
        id,
        project: project.to_string(),
        name: name.to_string(),
        created_ms,
    }
}

pub(crate) fn version_event(
    kind: EventKind,
    ds: &Dataset,
    id: &VersionId,
    version: &str,
    tags: &[String],
) -> Event {
    let mut e = Event::new(kind);
    e.dataset = Some(ds.id.to_string());
    e.project = ds.project.clone();
    e.name = ds.name.clone();
    e.version_id = Some(id.to_hex());
    e.version = Some(version.to_string());
    e.tags = tags.to_vec();
    e
}

impl Repo {
    /// Creates a repository (RocksDB) in `dir` (the `.dsv` folder).
    pub fn init(dir: &Path, config: RepoConfig, opts: StoreOptions) -> Result<Repo> {
        let repo = Repo {
            store: Store::init(dir, config, opts)?,
        };
        repo.index_version_order()?;
        Ok(repo)
    }

    /// Builds the indexes of versions in finalize order and by version
    /// string when they are not complete ([`keys::VERSION_ORDER`],
    /// [`keys::VERSION_NAME`]; at init, and for a repository made before
    /// they existed, by `dsv upgrade`). Returns whether it wrote.
    pub fn index_version_order(&self) -> Result<bool> {
        // The feature first: from here on a build that does not maintain
        // the index can no longer write.
        self.store
            .enable_ro_compat_feature(dsv_store::config::FEATURE_VERSION_ORDER)?;
        self.store
            .enable_ro_compat_feature(dsv_store::config::FEATURE_VERSION_NAMES)?;
        {
            let kv = self.store.reader();
            if kv.get(Cf::App, keys::VERSION_ORDER_COMPLETE)?.is_some() && names_complete(&*kv)? {
                return Ok(false);
            }
        }
        self.write(|kv| {
            let b = backfill_version_indexes(kv)?;
            let wrote = !b.is_empty();
            Ok((b, wrote))
        })
    }

    /// Opens the repository in `dir` (the `.dsv` folder).
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Repo> {
        Ok(Repo {
            store: Store::open(dir, opts)?,
        })
    }

    /// Wraps an open store.
    pub fn from_store(store: Store) -> Repo {
        Repo { store }
    }

    /// The engine.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The repository folder's path relative to `folder` when it lies
    /// inside it (its files are never ingested).
    fn repo_inside(&self, folder: &Path) -> Option<Vec<u8>> {
        let f = std::fs::canonicalize(folder).ok()?;
        let r = std::fs::canonicalize(self.store.dir()).ok()?;
        let rel = r.strip_prefix(&f).ok()?;
        Some(rel.as_os_str().as_encoded_bytes().to_vec())
    }

    /// One transaction whose closure may fail with porcelain errors. The
    /// closure may run more than once (after a conflict with another
    /// writer): it must only read and build its batch.
    pub(crate) fn write<T>(
        &self,
        mut f: impl FnMut(&dyn KvRead) -> Result<(Batch, T)>,
    ) -> Result<T> {
        let mut parked = Parked::default();
        let r = self.store.write(|kv| {
            parked.reset();
            f(kv).map_err(|e| parked.park(e))
        });
        r.map_err(|e| parked.unpark(e))
    }

    /// A claim ([`dsv_store::Store::claim`]) whose closure may fail with
    /// porcelain errors: `f` gets the first entry under each prefix that no
    /// concurrent claimer holds.
    pub(crate) fn claim<T>(
        &self,
        prefixes: &[Vec<u8>],
        mut f: impl FnMut(&dyn KvRead, &[(Vec<u8>, Vec<u8>)]) -> Result<(Batch, T)>,
    ) -> Result<T> {
        let mut parked = Parked::default();
        let r = self.store.claim(prefixes, |kv, found| {
            parked.reset();
            f(kv, found).map_err(|e| parked.park(e))
        });
        r.map_err(|e| parked.unpark(e))
    }

    /// [`Repo::write`] for writes that free space: on a full disk the
    /// engine releases the repository's reserve and runs `f` once more.
    pub(crate) fn write_freeing<T>(
        &self,
        mut f: impl FnMut(&dyn KvRead) -> Result<(Batch, T)>,
    ) -> Result<T> {
        let mut parked = Parked::default();
        let r = self.store.write_freeing(|kv| {
            parked.reset();
            f(kv).map_err(|e| parked.park(e))
        });
        r.map_err(|e| parked.unpark(e))
    }

    // ---- datasets ---------------------------------------------------------

    /// Every dataset, sorted by project then name.
    pub fn datasets(&self) -> Result<Vec<Dataset>> {
        let kv = self.store.reader();
        let mut ids = Vec::new();
        kv.scan(Cf::App, keys::DATASET_NAME, &mut |_, v| {
            ids.extend(DatasetId::from_slice(v));
            Ok(true)
        })?;
        ids.iter().map(|id| dataset_in(&*kv, id)).collect()
    }

    /// The dataset `project/name`, if it exists.
    pub fn dataset(&self, project: &str, name: &str) -> Result<Option<Dataset>> {
        dataset_by_name_in(&*self.store.reader(), project, name)
    }

    fn require_dataset(&self, project: &str, name: &str) -> Result<Dataset> {
        self.dataset(project, name)?
            .ok_or_else(|| Error::DatasetNotFound(format!("{project}/{name}")))
    }

    /// Renames or moves a dataset; its versions keep their ids.
    pub fn rename_dataset(&self, from: &str, to: &str) -> Result<Dataset> {
        let (p0, n0) = parse_dataset_name(from)?;
        let (p1, n1) = parse_dataset_name(to)?;
        self.write(|kv| {
            let ds = dataset_by_name_in(kv, &p0, &n0)?
                .ok_or_else(|| Error::DatasetNotFound(from.to_string()))?;
            if dataset_by_name_in(kv, &p1, &n1)?.is_some() {
                return Err(Error::Invalid(format!("dataset {to} already exists")));
            }
            let mut b = Batch::default();
            let rec_v = kv
                .get(Cf::App, &keys::dataset(&ds.id))?
                .ok_or_else(|| Error::corrupted(format!("dataset {}", ds.id), "record missing"))?;
            let mut rec: DatasetRecord = from_json(&rec_v, "dataset")?;
            rec.project = p1.clone();
            rec.name = n1.clone();
            b.put(Cf::App, keys::dataset(&ds.id), to_json(&rec));
            b.delete(Cf::App, keys::dataset_name(&p0, &n0));
            b.put(Cf::App, keys::dataset_name(&p1, &n1), ds.id.0.to_vec());
            let mut ev = EventWriter::sequenced();
            let mut e = Event::new(EventKind::DatasetRenamed);
            e.dataset = Some(ds.id.to_string());
            e.project = p1.clone();
            e.name = n1.clone();
            e.extra.insert("from".into(), serde_json::json!(from));
            ev.push(&mut b, e);
            Ok((
                b,
                Dataset {
                    project: p1.clone(),
                    name: n1.clone(),
                    ..ds
                },
            ))
        })
    }

    // ---- versions ---------------------------------------------------------

    fn assemble(
        &self,
        kv: &dyn KvRead,
        ds: Dataset,
        id: VersionId,
        info: VersionInfo,
    ) -> Result<DatasetVersion> {
        let meta = version_meta_in(kv, &id)?;
        Ok(dataset_version(ds, id, info, tags_of_in(kv, &id)?, meta))
    }

    fn version_in_kv(&self, kv: &dyn KvRead, id: &VersionId) -> Result<DatasetVersion> {
        let Some((ds_id, created)) = version_dataset_in(kv, id)? else {
            if let Some(k) = kept_in(kv, id)? {
                let ds = dataset_in(kv, &k.dataset)?;
                let mut v = dataset_version(ds, *id, k.info, Vec::new(), version_meta_in(kv, id)?);
                v.deleted = true;
                return Ok(v);
            }
            return Err(Error::RevisionNotFound(format!(
                "version {id} is not a dataset version (or was deleted)"
            )));
        };
        let ds = dataset_in(kv, &ds_id)?;
        let v = kv
            .get(Cf::App, &keys::dataset_version(&ds_id, created, id))?
            .ok_or_else(|| Error::corrupted(format!("version index {id}"), "entry missing"))?;
        let info: VersionInfo = from_json(&v, "version index")?;
        self.assemble(kv, ds, *id, info)
    }

    /// A dataset version by id.
    pub fn version(&self, id: &VersionId) -> Result<DatasetVersion> {
        self.version_in_kv(&*self.store.reader(), id)
    }

    /// Versions of a dataset, newest first (in finalize order).
    pub fn versions(&self, ds: &Dataset) -> Result<Vec<DatasetVersion>> {
        let kv = self.store.reader();
        let mut vs = versions_in(&*kv, &ds.id)?;
        sort_newest_first(&mut vs);
        // Many versions: load every tag and metadata record in two scans
        // rather than two lookups per version.
        if vs.len() > 64 {
            let mut tags: std::collections::HashMap<VersionId, Vec<String>> = Default::default();
            kv.scan(
                Cf::Tags,
                &[dsv_store::schema::TAG_BY_VERSION],
                &mut |k, _| {
                    if let Some(id) = VersionId::from_slice(k.get(1..33).unwrap_or_default()) {
                        tags.entry(id)
                            .or_default()
                            .push(String::from_utf8_lossy(&k[33..]).into_owned());
                    }
                    Ok(true)
                },
            )?;
            let mut metas: std::collections::HashMap<VersionId, Vec<u8>> = Default::default();
            kv.scan(Cf::App, keys::VERSION_META, &mut |k, v| {
                if let Some(id) = VersionId::from_slice(&k[keys::VERSION_META.len()..]) {
                    metas.insert(id, v.to_vec());
                }
                Ok(true)
            })?;
            return vs
                .into_iter()
                .map(|(id, info)| {
                    let meta: VersionMeta = match metas.get(&id) {
                        Some(v) => from_json(v, &format!("metadata of {id}"))?,
                        None => VersionMeta::default(),
                    };
                    let t = tags.remove(&id).unwrap_or_default();
                    Ok(dataset_version(ds.clone(), id, info, t, meta))
                })
                .collect();
        }
        vs.into_iter()
            .map(|(id, info)| self.assemble(&*kv, ds.clone(), id, info))
            .collect()
    }

    /// Versions of every dataset matching `project` / `name` (either may be
    /// `None`) and carrying every tag, newest first.
    pub fn list(
        &self,
        project: Option<&str>,
        name: Option<&str>,
        tags: &[String],
    ) -> Result<Vec<DatasetVersion>> {
        self.list_limited(project, name, tags, None)
    }

    /// [`Repo::list`], at most `limit` versions (the newest): reads only
    /// those of each dataset when the finalize-order index is complete.
    pub fn list_limited(
        &self,
        project: Option<&str>,
        name: Option<&str>,
        tags: &[String],
        limit: Option<usize>,
    ) -> Result<Vec<DatasetVersion>> {
        let mut out = Vec::new();
        for ds in self.datasets()? {
            if project.is_some_and(|p| p != ds.project && !ds.project.starts_with(&format!("{p}/")))
            {
                continue;
            }
            if name.is_some_and(|n| n != ds.name) {
                continue;
            }
            out.extend(self.versions_matching(&ds, tags, limit)?);
        }
        Ok(merge_newest_first(out, limit))
    }

    /// A dataset's versions carrying every tag of `tags`, newest first; at
    /// most `limit`.
    fn versions_matching(
        &self,
        ds: &Dataset,
        tags: &[String],
        limit: Option<usize>,
    ) -> Result<Vec<DatasetVersion>> {
        let Some(n) = limit else {
            return Ok(self
                .versions(ds)?
                .into_iter()
                .filter(|v| tags.iter().all(|t| v.tags.contains(t)))
                .collect());
        };
        let kv = self.store.reader();
        let found = newest_versions_in(&*kv, &ds.id, n, &mut |id, _| {
            if tags.is_empty() {
                return Ok(true);
            }
            let have = dsv_store::store::tags_of_in(&*kv, id)?;
            Ok(tags.iter().all(|t| have.contains(t)))
        })?;
        found
            .into_iter()
            .map(|(id, info)| self.assemble(&*kv, ds.clone(), id, info))
            .collect()
    }

    /// `dataset list PATH`: the dataset PATH names (as `PROJECT/NAME`) when
    /// it exists, and every dataset of project PATH or one of its
    /// sub-projects (`a/b` lists `a/b`, `a/b/c`, `a/b/x/y`), carrying every
    /// tag, newest first; `None` when PATH names no dataset and no project.
    pub fn list_path(&self, path: &str, tags: &[String]) -> Result<Option<Vec<DatasetVersion>>> {
        self.list_path_limited(path, tags, None)
    }

    /// [`Repo::list_path`], at most `limit` versions (the newest).
    pub fn list_path_limited(
        &self,
        path: &str,
        tags: &[String],
        limit: Option<usize>,
    ) -> Result<Option<Vec<DatasetVersion>>> {
        let path = path.trim().trim_end_matches('/');
        let exact = parse_dataset_name(path).ok();
        let sub = format!("{path}/");
        let mut any = false;
        let mut out = Vec::new();
        for ds in self.datasets()? {
            let is_exact = exact
                .as_ref()
                .is_some_and(|(p, n)| p == &ds.project && n == &ds.name);
            let below = ds.project == path || ds.project.starts_with(&sub);
            if !is_exact && !below {
                continue;
            }
            any = true;
            out.extend(self.versions_matching(&ds, tags, limit)?);
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(merge_newest_first(out, limit)))
    }

    /// The newest version of a dataset.
    pub fn latest(&self, ds: &Dataset) -> Result<Option<DatasetVersion>> {
        let kv = self.store.reader();
        match newest_in(&*kv, &ds.id)? {
            None => Ok(None),
            Some((id, info)) => Ok(Some(self.assemble(&*kv, ds.clone(), id, info)?)),
        }
    }

    /// Resolves a revision string.
    pub fn resolve(&self, spec: &str) -> Result<DatasetVersion> {
        match RevSpec::parse(spec)? {
            RevSpec::Id(prefix) => {
                let id = match self.store.resolve_version_prefix(&prefix) {
                    Ok(id) => id,
                    Err(e @ dsv_store::Error::NotFound { .. }) => {
                        // A version deleted with --force and kept for the
                        // tasks and models that reference it.
                        let kv = self.store.reader();
                        let mut found = Vec::new();
                        kv.scan(Cf::App, keys::KEPT_VERSION, &mut |k, _| {
                            if let Some(id) = VersionId::from_slice(&k[keys::KEPT_VERSION.len()..])
                            {
                                if id.to_hex().starts_with(&prefix) {
                                    found.push(id);
                                }
                            }
                            Ok(true)
                        })?;
                        match found.as_slice() {
                            [one] => *one,
                            _ => return Err(e.into()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                };
                self.version(&id)
            }
            RevSpec::Dataset {
                project,
                name,
                selector,
            } => {
                let ds = self.require_dataset(&project, &name)?;
                let kv = self.store.reader();
                if selector.is_none() {
                    if let Some((id, info)) = newest_in(&*kv, &ds.id)? {
                        return self.assemble(&*kv, ds, id, info);
                    }
                }
                // A version string first (a few keys of the name index),
                // then a tag.
                let found = match &selector {
                    None => None,
                    Some(sel) => {
                        let named: Vec<_> = versions_named_in(&*kv, &ds.id, sel)?
                            .into_iter()
                            .filter(|(_, i)| &i.version == sel)
                            .collect();
                        match newest(named.iter()) {
                            Some(v) => Some(v.clone()),
                            None => {
                                let mut tagged = Vec::new();
                                for id in self.store.versions_tagged(sel)? {
                                    if let Some(info) = version_info_in(&*kv, &ds.id, &id)? {
                                        tagged.push((id, info));
                                    }
                                }
                                newest(tagged.iter()).cloned()
                            }
                        }
                    }
                };
                match found {
                    Some((id, info)) => self.assemble(&*kv, ds, id, info),
                    None => Err(Error::RevisionNotFound(match selector {
                        None => format!("dataset {project}/{name} has no finalized version"),
                        Some(s) => format!("dataset {project}/{name} has no version or tag '{s}'"),
                    })),
                }
            }
        }
    }

    /// ClearML's `Dataset.get`: by id, or by project/name narrowed by
    /// version and tags; the newest (last finalized) match wins.
    pub fn get(&self, q: &GetQuery) -> Result<Got> {
        let found: Option<DatasetVersion> = if let Some(id) = &q.id {
            Some(self.resolve(id)?)
        } else {
            let (Some(project), Some(name)) = (&q.project, &q.name) else {
                return Err(Error::Invalid(
                    "get needs an id, or a project and a name".into(),
                ));
            };
            match self.dataset(project, name)? {
                None => None,
                // The newest match, from the indexes: the versions of that
                // version string (a few keys), or the newest versions in
                // finalize order until one carries every tag.
                Some(ds) => match &q.version {
                    None => self.versions_matching(&ds, &q.tags, Some(1))?.pop(),
                    Some(x) => {
                        let kv = self.store.reader();
                        let mut named = Vec::new();
                        for (id, info) in versions_named_in(&*kv, &ds.id, x)? {
                            if &info.version != x {
                                continue;
                            }
                            let have = dsv_store::store::tags_of_in(&*kv, &id)?;
                            if q.tags.iter().all(|t| have.contains(t)) {
                                named.push((id, info));
                            }
                        }
                        match newest(named.iter()) {
                            Some((id, info)) => Some(self.assemble(&*kv, ds, *id, info.clone())?),
                            None => None,
                        }
                    }
                },
            }
        };
        if !q.only_finalized && q.id.is_none() {
            if let (Some(p), Some(n)) = (&q.project, &q.name) {
                if let Some(ds) = self.dataset(p, n)? {
                    let newest_draft = self
                        .drafts(Some(&ds))?
                        .into_iter()
                        .filter(|d| {
                            found
                                .as_ref()
                                .is_none_or(|v| d.info.created_ms >= v.created_ms)
                        })
                        .max_by_key(|d| d.info.created_ms);
                    if let Some(d) = newest_draft {
                        if !q.writable_copy {
                            return Ok(Got::Draft(Box::new(d)));
                        }
                    }
                }
            }
        }
        match found {
            Some(v) if q.writable_copy => Ok(Got::Draft(Box::new(self.writable_copy(&v)?))),
            Some(v) => Ok(Got::Version(Box::new(v))),
            None if q.auto_create => {
                let (Some(p), Some(n)) = (&q.project, &q.name) else {
                    return Err(Error::Invalid(
                        "auto_create needs a project and a name".into(),
                    ));
                };
                let d = self.create(
                    p,
                    n,
                    &CreateOptions {
                        version: q.version.clone(),
                        tags: q.tags.clone(),
                        auto_create: true,
                        ..Default::default()
                    },
                )?;
                Ok(Got::Draft(Box::new(d)))
            }
            None => Err(Error::RevisionNotFound(match (&q.project, &q.name) {
                (Some(p), Some(n)) => format!(
                    "no version of {p}/{n} matches (version {:?}, tags {:?})",
                    q.version, q.tags
                ),
                _ => "no version matches".to_string(),
            })),
        }
    }

    // ---- drafts -----------------------------------------------------------

    /// Starts a draft of `project/name` (created when `auto_create`).
    pub fn create(&self, project: &str, name: &str, opts: &CreateOptions) -> Result<DraftHandle> {
        parse_dataset_name(&format!("{project}/{name}"))?;
        if let Some(v) = &opts.version {
            check_version_string(v)?;
        }
        for t in &opts.tags {
            crate::rev::validate_tag(t)?;
        }
        let id = self.write(|kv| {
            let mut b = Batch::default();
            let mut ev = EventWriter::sequenced();
            let ds = match dataset_by_name_in(kv, project, name)? {
                Some(d) => d,
                None if opts.auto_create => {
                    new_dataset_batch(&mut b, &mut ev, DatasetId::random()?, project, name)
                }
                None => return Err(Error::DatasetNotFound(format!("{project}/{name}"))),
            };
            if let Some(v) = &opts.version {
                check_version_free_in(kv, &ds, v)?;
            }
            let draft = self.store.create_draft_batch(kv, &opts.parents, &mut b)?;
            let info = DraftInfo {
                dataset: ds.id,
                version: opts.version.clone(),
                tags: opts.tags.clone(),
                message: opts.message.clone(),
                created_ms: dsv_store::store::now_ms(),
                watch: opts.watch.clone(),
            };
            b.put(Cf::App, keys::draft(&draft), to_json(&info));
            Ok((b, draft))
        })?;
        self.draft(&id)
    }

    /// A new draft whose parent is `v` (same dataset).
    pub fn writable_copy(&self, v: &DatasetVersion) -> Result<DraftHandle> {
        self.create(
            &v.dataset.project,
            &v.dataset.name,
            &CreateOptions {
                parents: vec![v.id],
                ..Default::default()
            },
        )
    }

    /// The labeling tool's start: a draft on top of the dataset's newest
    /// version, creating the dataset on first use.
    pub fn writable_copy_or_create(
        &self,
        project: &str,
        name: &str,
        opts: &CreateOptions,
    ) -> Result<DraftHandle> {
        let mut o = opts.clone();
        o.auto_create = true;
        if o.parents.is_empty() {
            if let Some(ds) = self.dataset(project, name)? {
                if let Some(v) = self.latest(&ds)? {
                    o.parents = vec![v.id];
                }
            }
        }
        self.create(project, name, &o)
    }

    /// Reads a draft (open or finalized).
    pub fn draft(&self, id: &DraftId) -> Result<DraftHandle> {
        let kv = self.store.reader();
        let info = draft_info_in(&*kv, id)?.ok_or_else(|| Error::NotADatasetDraft(id.to_hex()))?;
        let d = self.store.draft(id)?;
        let ds = dataset_in(&*kv, &info.dataset)?;
        let summary = KvObjects(&*kv).tree(&d.record.root)?.summary();
        Ok(DraftHandle {
            id: *id,
            dataset: ds,
            parents: d.record.parents.clone(),
            info,
            file_count: summary.file_count,
            total_bytes: summary.total_size,
        })
    }

    /// Resolves the id prefix of an open draft. What is not one is named:
    /// a dataset name, a finalized version, or a draft that was finalized
    /// (with the version it became), each with the way to get a draft.
    pub fn resolve_draft(&self, prefix: &str) -> Result<DraftHandle> {
        let spec = prefix.trim();
        if spec.contains('/') || spec.contains('@') {
            let open = parse_dataset_name(spec.split('@').next().unwrap_or(spec))
                .ok()
                .and_then(|(p, n)| self.dataset(&p, &n).ok().flatten())
                .map(|ds| self.drafts(Some(&ds)))
                .transpose()?
                .unwrap_or_default();
            let open = match open.as_slice() {
                [] => String::new(),
                ds => format!(
                    " (open drafts of it: {})",
                    ds.iter()
                        .map(|d| d.id.short(12))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(Error::NotADraft(format!(
                "'{spec}' is a dataset revision, not a draft id{open}; start a draft with \
                 'dsv dataset create {} --from-latest' (its id is printed), or list drafts \
                 with 'dsv dataset drafts'",
                spec.split('@').next().unwrap_or(spec)
            )));
        }
        let id = match self.store.resolve_draft_prefix(spec) {
            Ok(id) => id,
            Err(dsv_store::Error::NotFound { .. }) => {
                // A version id where a draft id belongs?
                if let Ok(v) = self
                    .store
                    .resolve_version_prefix(spec)
                    .map_err(Error::from)
                    .and_then(|v| self.version(&v))
                {
                    return Err(Error::NotADraft(format!(
                        "{spec} is version {}, which is finalized and cannot change; make a \
                         draft from it with 'dsv dataset create {} --parent {}'",
                        v.label(),
                        v.dataset.full_name(),
                        v.id.short(12)
                    )));
                }
                return Err(Error::NotADraft(format!(
                    "draft not found: {spec}; 'dsv dataset drafts' lists open drafts"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let d = self.store.draft(&id)?;
        if let Some(v) = d.record.finalized {
            let (what, dataset) = match self.version(&v) {
                Ok(v) => (v.label(), v.dataset.full_name()),
                Err(_) => (
                    format!("{} (since deleted)", v.short(12)),
                    "PROJECT/NAME".to_string(),
                ),
            };
            return Err(Error::NotADraft(format!(
                "draft {} was already finalized into version {what} and cannot change; make a \
                 new draft with 'dsv dataset create {dataset} --parent {}'",
                id.short(12),
                v.short(12)
            )));
        }
        self.draft(&id)
    }

    /// Resolves a revision, or else a draft id prefix: an open draft, or the
    /// version a finalized draft became.
    pub fn resolve_any(&self, spec: &str) -> Result<Resolved> {
        let err = match self.resolve(spec) {
            Ok(v) => {
                return Ok(Resolved::Version {
                    version: Box::new(v),
                    from_draft: None,
                })
            }
            Err(e) => e,
        };
        let not_found = matches!(
            err,
            Error::Store(dsv_store::Error::NotFound { .. }) | Error::RevisionNotFound(_)
        );
        let Ok(RevSpec::Id(prefix)) = RevSpec::parse(spec) else {
            return Err(err);
        };
        if !not_found {
            return Err(err);
        }
        let Ok(id) = self.store.resolve_draft_prefix(&prefix) else {
            return Err(err);
        };
        match self.store.draft(&id)?.record.finalized {
            Some(v) => Ok(Resolved::Version {
                version: Box::new(self.version(&v)?),
                from_draft: Some(id),
            }),
            None => Ok(Resolved::Draft(Box::new(self.draft(&id)?))),
        }
    }

    /// Files of an open draft (optionally matching a glob), in path order.
    pub fn draft_files(&self, d: &DraftHandle, glob: Option<&str>) -> Result<Vec<FileItem>> {
        let root = self.store.draft(&d.id)?.record.root;
        self.files_of_root(&root, glob)
    }

    /// Bytes newly stored by a draft's changes so far.
    pub fn draft_stored_bytes(&self, d: &DraftHandle) -> Result<u64> {
        Ok(self.store.draft(&d.id)?.record.stored_bytes)
    }

    /// Open drafts (of one dataset, or all).
    pub fn drafts(&self, of: Option<&Dataset>) -> Result<Vec<DraftHandle>> {
        let mut ids = Vec::new();
        self.store
            .reader()
            .scan(Cf::App, keys::DRAFT, &mut |k, _| {
                ids.extend(DraftId::from_slice(&k[keys::DRAFT.len()..]));
                Ok(true)
            })?;
        let mut out = Vec::new();
        for id in ids {
            let d = self.draft(&id)?;
            if of.is_none_or(|ds| ds.id == d.dataset.id) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Marks a draft as fed by `watch` from `folder` (so a restarted watch
    /// resumes it).
    pub fn set_draft_watch(&self, draft: &DraftId, folder: Option<String>) -> Result<()> {
        self.write(|kv| {
            let mut info =
                draft_info_in(kv, draft)?.ok_or_else(|| Error::NotADatasetDraft(draft.to_hex()))?;
            info.watch = folder.clone();
            let mut b = Batch::default();
            b.put(Cf::App, keys::draft(draft), to_json(&info));
            Ok((b, ()))
        })
    }

    /// Adds files and folders to a draft. Each path is staged in one atomic
    /// write; a failure leaves earlier paths staged and the draft valid.
    pub fn add(
        &self,
        draft: &DraftHandle,
        paths: &[PathBuf],
        opts: &AddOptions<'_>,
    ) -> Result<AddReport> {
        crate::rev::validate_dataset_path(&opts.dataset_path)?;
        let set = PathPattern::new(&opts.wildcards)?;
        let mut total = AddReport::default();
        for p in paths {
            let meta = std::fs::symlink_metadata(p)
                .map_err(|e| dsv_store::Error::input("read", p.clone(), e))?;
            let filter_set = set.clone();
            let (folder, filter, recursive): (PathBuf, Box<dsv_store::ingest::PathFilter>, bool) =
                if meta.is_dir() {
                    let skip = self.repo_inside(p);
                    (
                        p.clone(),
                        Box::new(move |rel: &[u8]| {
                            !in_repo(&skip, rel)
                                && filter_set.as_ref().is_none_or(|s| s.matches(rel))
                        }),
                        !opts.non_recursive,
                    )
                } else {
                    let name = p
                        .file_name()
                        .ok_or_else(|| Error::Invalid(format!("{}: not a file name", p.display())))?
                        .as_encoded_bytes()
                        .to_vec();
                    let parent = match p.parent() {
                        Some(x) if !x.as_os_str().is_empty() => x.to_path_buf(),
                        _ => PathBuf::from("."),
                    };
                    if let Some(s) = &set {
                        if !s.matches(&name) {
                            continue;
                        }
                    }
                    (
                        parent,
                        Box::new(move |rel: &[u8]| rel == name.as_slice()),
                        false,
                    )
                };
            let r = self.store.stage_folder(
                &draft.id,
                &folder,
                &IngestOptions {
                    dataset_path: &opts.dataset_path,
                    mode: StageMode::Add,
                    recursive,
                    filter: Some(&*filter),
                    progress: opts.progress.unwrap_or(&NoProgress),
                },
            )?;
            let one = report_of(&r);
            total.added.extend(one.added);
            total.modified.extend(one.modified);
            total.renamed.extend(one.renamed);
            total.unchanged += one.unchanged;
            total.bytes += one.bytes;
            total.bytes_hashed += one.bytes_hashed;
            total.stored_bytes += one.stored_bytes;
        }
        Ok(total)
    }

    /// Makes the draft's `dataset_path` match `folder` exactly (adds,
    /// modifies and removes).
    pub fn sync_folder(
        &self,
        draft: &DraftHandle,
        folder: &Path,
        dataset_path: &str,
        progress: Option<&dyn Progress>,
    ) -> Result<AddReport> {
        crate::rev::validate_dataset_path(dataset_path)?;
        let skip = self.repo_inside(folder);
        let filter = move |rel: &[u8]| !in_repo(&skip, rel);
        let r = self.store.stage_folder(
            &draft.id,
            folder,
            &IngestOptions {
                dataset_path,
                mode: StageMode::Sync,
                recursive: true,
                filter: Some(&filter),
                progress: progress.unwrap_or(&NoProgress),
            },
        )?;
        Ok(report_of(&r))
    }

    /// Removes the draft's files matching any pattern (a glob over the
    /// path, or a folder path). Fails, changing nothing, when a pattern
    /// matches nothing.
    pub fn remove(&self, draft: &DraftHandle, patterns: &[String]) -> Result<Vec<String>> {
        let root = self.store.draft(&draft.id)?.record.root;
        let kv = self.store.reader();
        let r = KvObjects(&*kv);
        let mut changes: Vec<(Vec<u8>, Change)> = Vec::new();
        let mut removed = Vec::new();
        for pat in patterns {
            let trimmed = pat.trim_matches('/');
            let mut hit = false;
            if let Some(e) = dsv_store::tree::lookup(&r, &root, trimmed.as_bytes())
                .ok()
                .flatten()
            {
                hit = true;
                match &e.target {
                    EntryTarget::Dir { id, .. } => {
                        walk_files(&r, id, trimmed.as_bytes(), &mut |p, _| {
                            removed.push(lossy(p));
                            Ok(())
                        })?
                    }
                    _ => removed.push(trimmed.to_string()),
                }
                changes.push((trimmed.as_bytes().to_vec(), Change::Remove));
            } else {
                let set = PathPattern::new(std::slice::from_ref(pat))?.expect("one pattern");
                walk_files(&r, &root, b"", &mut |p, _| {
                    if set.matches(p) {
                        hit = true;
                        removed.push(lossy(p));
                        changes.push((p.to_vec(), Change::Remove));
                    }
                    Ok(())
                })?;
            }
            if !hit {
                return Err(Error::Invalid(format!(
                    "no file in draft {} matches '{pat}'",
                    draft.id.short(12)
                )));
            }
        }
        drop(kv);
        self.store.stage_changes(&draft.id, changes)?;
        removed.sort();
        removed.dedup();
        Ok(removed)
    }

    /// Freezes a draft into a version: version string (explicit or next
    /// patch), tags, index records and a `version_finalized` event — one
    /// atomic write.
    pub fn finalize(&self, draft: &DraftHandle) -> Result<DatasetVersion> {
        let id = self.write(|kv| {
            let info = draft_info_in(kv, &draft.id)?
                .ok_or_else(|| Error::NotADatasetDraft(draft.id.to_hex()))?;
            let ds = dataset_in(kv, &info.dataset)?;
            let version = match &info.version {
                Some(v) => {
                    check_version_free_in(kv, &ds, v)?;
                    v.clone()
                }
                None => next_version_in(kv, &ds.id)?,
            };
            let mut b = Batch::default();
            let mut meta = BTreeMap::new();
            meta.insert(META_DATASET.to_string(), ds.id.to_string());
            let v = self
                .store
                .finalize_batch(kv, &draft.id, &info.message, meta, &mut b)?;
            for t in &info.tags {
                add_tag_batch(&v.id, t, &mut b)?;
            }
            b.delete(Cf::App, keys::draft(&draft.id));
            let mut ev = EventWriter::new(kv)?;
            let seq = ev.push_numbered(
                &mut b,
                version_event(
                    EventKind::VersionFinalized,
                    &ds,
                    &v.id,
                    &version,
                    &info.tags,
                ),
            )?;
            index_version_batch(&mut b, &ds.id, &v, &version, seq);
            Ok((b, v.id))
        })?;
        self.version(&id)
    }

    /// Discards an open draft.
    pub fn discard(&self, draft: &DraftHandle) -> Result<()> {
        self.write(|kv| {
            let mut b = Batch::default();
            self.store.discard_draft_batch(kv, &draft.id, &mut b)?;
            b.delete(Cf::App, keys::draft(&draft.id));
            Ok((b, ()))
        })
    }

    /// The "upload" button: makes `project/name`'s newest version match
    /// `folder` (at `dataset_path`) as a new version, creating the dataset
    /// on first use; creates nothing when nothing changed. One read of the
    /// changed files, one atomic write.
    pub fn sync(
        &self,
        project: &str,
        name: &str,
        folder: &Path,
        opts: &SyncOptions<'_>,
    ) -> Result<SyncOutcome> {
        parse_dataset_name(&format!("{project}/{name}"))?;
        for t in &opts.tags {
            crate::rev::validate_tag(t)?;
        }
        if let Some(v) = &opts.version {
            check_version_string(v)?;
        }
        crate::rev::validate_dataset_path(&opts.dataset_path)?;
        let md = std::fs::metadata(folder)
            .map_err(|e| dsv_store::Error::input("read folder", folder, e))?;
        if !md.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is not a folder",
                folder.display()
            )));
        }
        // The dataset's id: existing, or chosen now for a dataset this sync
        // creates (so the version object can record it).
        let (ds_id, latest) = match self.dataset(project, name)? {
            Some(ds) => (ds.id, self.latest(&ds)?),
            None => (DatasetId::random()?, None),
        };
        let parent_id = latest.as_ref().map(|v| v.id);
        let parents: Vec<VersionId> = parent_id.into_iter().collect();
        let mut parked = Parked::default();
        let mut new_version: Option<VersionId> = None;
        let mut extra =
            |kv: &dyn KvRead, v: &dsv_store::Version, b: &mut Batch| -> dsv_store::Result<()> {
                parked.reset();
                new_version = None;
                let r: Result<()> = (|| {
                    let mut ev = EventWriter::new(kv)?;
                    let ds = match dataset_by_name_in(kv, project, name)? {
                        Some(d) => d,
                        None => new_dataset_batch(b, &mut ev, ds_id, project, name),
                    };
                    let now_latest = newest_in(kv, &ds.id)?.map(|x| x.0);
                    if now_latest != parent_id {
                        return Err(Error::Conflict(format!(
                            "dataset {project}/{name} got a new version while syncing"
                        )));
                    }
                    if ds.id != ds_id {
                        return Err(Error::Conflict(format!(
                            "dataset {project}/{name} was replaced while syncing"
                        )));
                    }
                    let version = match &opts.version {
                        Some(x) => {
                            check_version_free_in(kv, &ds, x)?;
                            x.clone()
                        }
                        None => next_version_in(kv, &ds.id)?,
                    };
                    for t in &opts.tags {
                        add_tag_batch(&v.id, t, b)?;
                    }
                    let seq = ev.push_numbered(
                        b,
                        version_event(
                            EventKind::VersionFinalized,
                            &ds,
                            &v.id,
                            &version,
                            &opts.tags,
                        ),
                    )?;
                    index_version_batch(b, &ds.id, v, &version, seq);
                    new_version = Some(v.id);
                    Ok(())
                })();
                r.map_err(|e| parked.park(e))
            };
        let mut meta = BTreeMap::new();
        meta.insert(META_DATASET.to_string(), ds_id.to_string());
        let skip = self.repo_inside(folder);
        let filter = move |rel: &[u8]| !in_repo(&skip, rel);
        let out = self
            .store
            .commit_folder(
                &parents,
                folder,
                &IngestOptions {
                    dataset_path: &opts.dataset_path,
                    mode: StageMode::Sync,
                    recursive: true,
                    filter: Some(&filter),
                    progress: opts.progress.unwrap_or(&NoProgress),
                },
                &opts.message,
                meta,
                &mut extra,
            )
            .map_err(|e| parked.unpark(e))?;
        let report = report_of(&out.report);
        match new_version {
            Some(id) => Ok(SyncOutcome {
                version: Some(self.version(&id)?),
                unchanged_from: None,
                report,
            }),
            None => Ok(SyncOutcome {
                version: None,
                unchanged_from: parent_id,
                report,
            }),
        }
    }

    // ---- reading ----------------------------------------------------------

    fn root_of(&self, v: &VersionId) -> Result<dsv_store::ObjectId> {
        Ok(self.store.version(v)?.object.root)
    }

    /// Files of a version (optionally matching a glob), in path order.
    pub fn files(&self, v: &DatasetVersion, glob: Option<&str>) -> Result<Vec<FileItem>> {
        self.files_of_root(&self.root_of(&v.id)?, glob)
    }

    fn files_of_root(
        &self,
        root: &dsv_store::ObjectId,
        glob: Option<&str>,
    ) -> Result<Vec<FileItem>> {
        let set = match glob {
            Some(g) => PathPattern::new(&[g.to_string()])?,
            None => None,
        };
        let root = *root;
        let kv = self.store.reader();
        let mut out = Vec::new();
        walk_files(&KvObjects(&*kv), &root, b"", &mut |p, e| {
            if set.as_ref().is_none_or(|s| s.matches(p)) {
                out.push(item(p, e));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// What changed from `a` to `b`.
    pub fn diff(&self, a: &VersionId, b: &VersionId) -> Result<Changes> {
        Ok(changes_of(&self.store.diff_versions(a, b)?))
    }

    /// What changed against the first parent (everything is added for a
    /// version without parents).
    pub fn changes(&self, v: &DatasetVersion) -> Result<Changes> {
        let root = self.root_of(&v.id)?;
        let base = match v.parents.first() {
            Some(p) => self.root_of(p)?,
            None => dsv_store::tree::empty_tree_id(),
        };
        Ok(changes_of(&self.store.diff(&base, &root)?))
    }

    /// Streams one file of a version to `out`.
    pub fn cat(&self, v: &DatasetVersion, path: &str, out: &mut dyn std::io::Write) -> Result<u64> {
        let root = self.root_of(&v.id)?;
        Ok(self
            .store
            .cat(&root, path.trim_matches('/').as_bytes(), out)?)
    }

    /// A streaming reader over one file of a version.
    pub fn open_file(&self, v: &DatasetVersion, path: &str) -> Result<crate::FileReader<'_>> {
        let root = self.root_of(&v.id)?;
        let p = path.trim_matches('/');
        match self.store.lookup(&root, p.as_bytes())? {
            Some(Entry {
                target: EntryTarget::File(id),
                ..
            }) => Ok(crate::FileReader::new(
                &self.store,
                self.store.file_object(&id)?,
            )),
            Some(_) => Err(Error::Invalid(format!(
                "{p} in {} is not a regular file",
                v.id.short(12)
            ))),
            None => Err(dsv_store::Error::not_found(
                dsv_store::Kind::Path,
                format!("{p} in version {}", v.id.short(12)),
            )
            .into()),
        }
    }

    /// Previews of the tabular files of a version (at most `max_files`).
    pub fn preview(
        &self,
        v: &DatasetVersion,
        head: usize,
        max_files: usize,
        max_rows: u64,
    ) -> Result<Vec<crate::FilePreview>> {
        use std::io::BufRead;
        let mut out = Vec::new();
        for f in self.files(v, None)? {
            if out.len() >= max_files {
                break;
            }
            if f.symlink {
                continue;
            }
            let mut r = std::io::BufReader::with_capacity(64 << 10, self.open_file(v, &f.path)?);
            let head_bytes = r
                .fill_buf()
                .map_err(|e| Error::Invalid(format!("{}: {e}", f.path)))?;
            let line_end = head_bytes
                .iter()
                .position(|&c| c == b'\n')
                .unwrap_or(head_bytes.len());
            let Some(delim) = crate::preview::tabular_delimiter(&f.path, &head_bytes[..line_end])
            else {
                continue;
            };
            out.push(crate::preview::preview(&f.path, delim, r, head, max_rows)?);
        }
        Ok(out)
    }

    /// Rehashes every chunk of every file of a version (in parallel).
    pub fn verify(&self, v: &DatasetVersion) -> Result<Vec<VerifyMismatch>> {
        use rayon::prelude::*;
        let root = self.root_of(&v.id)?;
        let kv = self.store.reader();
        let mut files = Vec::new();
        walk_files(&KvObjects(&*kv), &root, b"", &mut |p, e| {
            if let EntryTarget::File(id) = e.target {
                files.push((lossy(p), id));
            }
            Ok(())
        })?;
        let mut bad: Vec<VerifyMismatch> = files
            .par_iter()
            .filter_map(
                |(p, id)| match self.store.read_file_to(id, &mut std::io::sink()) {
                    Ok(_) => None,
                    Err(e) => Some(VerifyMismatch {
                        path: p.clone(),
                        error: e.to_string(),
                    }),
                },
            )
            .collect();
        bad.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(bad)
    }

    // ---- tags, metadata ---------------------------------------------------

    /// Adds and removes tags; returns the version's tags after.
    pub fn tag(
        &self,
        v: &DatasetVersion,
        add: &[String],
        remove: &[String],
    ) -> Result<Vec<String>> {
        for t in add {
            crate::rev::validate_tag(t)?;
        }
        self.write(|kv| {
            let cur = self.version_in_kv(kv, &v.id)?;
            if cur.deleted {
                return Err(Error::Invalid(format!(
                    "version {} was deleted from {}; a deleted version cannot be tagged",
                    v.id.short(12),
                    cur.dataset.full_name()
                )));
            }
            let before: BTreeSet<String> = cur.tags.iter().cloned().collect();
            let mut after = before.clone();
            let mut b = Batch::default();
            for t in remove {
                if after.remove(t) {
                    remove_tag_batch(&v.id, t, &mut b);
                }
            }
            if !add.is_empty() {
                let mut named = None;
                for t in add {
                    if versions_named_in(kv, &cur.dataset.id, t)?
                        .iter()
                        .any(|(_, i)| &i.version == t)
                    {
                        named = Some(t);
                        break;
                    }
                }
                if let Some(t) = named {
                    return Err(Error::Invalid(format!(
                        "invalid tag '{t}': {} has a version '{t}', which {}@{t} names first",
                        cur.dataset.full_name(),
                        cur.dataset.full_name()
                    )));
                }
            }
            for t in add {
                if after.insert(t.clone()) {
                    add_tag_batch(&v.id, t, &mut b)?;
                }
            }
            let after_v: Vec<String> = after.iter().cloned().collect();
            if after != before {
                let mut ev = EventWriter::sequenced();
                let mut e = version_event(
                    EventKind::VersionTagged,
                    &cur.dataset,
                    &v.id,
                    &cur.version,
                    &after_v,
                );
                e.tags_added = after.difference(&before).cloned().collect();
                e.tags_removed = before.difference(&after).cloned().collect();
                ev.push(&mut b, e);
            }
            Ok((b, after_v))
        })
    }

    /// Sets user metadata keys (JSON values; `Null` removes a key) and
    /// optionally the description; returns the metadata after.
    pub fn set_metadata(
        &self,
        v: &DatasetVersion,
        set: &BTreeMap<String, serde_json::Value>,
        description: Option<&str>,
    ) -> Result<BTreeMap<String, serde_json::Value>> {
        self.write(|kv| {
            let cur = self.version_in_kv(kv, &v.id)?;
            let mut meta = version_meta_in(kv, &v.id)?;
            for (k, val) in set {
                if k.is_empty() {
                    return Err(Error::Invalid("empty metadata key".into()));
                }
                if val.is_null() {
                    meta.metadata.remove(k);
                } else {
                    meta.metadata.insert(k.clone(), val.clone());
                }
            }
            if let Some(d) = description {
                meta.description = d.to_string();
            }
            let mut b = Batch::default();
            b.put(Cf::App, keys::version_meta(&v.id), to_json(&meta));
            let mut ev = EventWriter::sequenced();
            let mut e = version_event(
                EventKind::VersionMetadata,
                &cur.dataset,
                &v.id,
                &cur.version,
                &cur.tags,
            );
            e.extra.insert(
                "keys".into(),
                serde_json::json!(set.keys().collect::<Vec<_>>()),
            );
            ev.push(&mut b, e);
            Ok((b, meta.metadata))
        })
    }

    // ---- squash, delete ---------------------------------------------------

    /// One standalone version of `project/name` (created if missing) whose
    /// files are the union of `sources` (later sources win per path).
    pub fn squash(
        &self,
        project: &str,
        name: &str,
        sources: &[DatasetVersion],
        version: Option<&str>,
        message: &str,
    ) -> Result<DatasetVersion> {
        if sources.is_empty() {
            return Err(Error::Invalid("squash needs at least one version".into()));
        }
        if let Some(v) = version {
            check_version_string(v)?;
        }
        parse_dataset_name(&format!("{project}/{name}"))?;
        let ids: Vec<VersionId> = sources.iter().map(|s| s.id).collect();
        let id = self.write(|kv| {
            let mut b = Batch::default();
            let mut ev = EventWriter::new(kv)?;
            let ds = match dataset_by_name_in(kv, project, name)? {
                Some(d) => d,
                None => new_dataset_batch(&mut b, &mut ev, DatasetId::random()?, project, name),
            };
            let ver = match version {
                Some(x) => {
                    check_version_free_in(kv, &ds, x)?;
                    x.to_string()
                }
                None => next_version_in(kv, &ds.id)?,
            };
            let mut meta = BTreeMap::new();
            meta.insert(META_DATASET.to_string(), ds.id.to_string());
            meta.insert(
                "dsv.squashed_from".into(),
                ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>().join(","),
            );
            let v = self.store.squash_batch(kv, &ids, message, meta, &mut b)?;
            let mut e = version_event(EventKind::VersionFinalized, &ds, &v.id, &ver, &[]);
            e.extra.insert(
                "squashed_from".into(),
                serde_json::json!(ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>()),
            );
            let seq = ev.push_numbered(&mut b, e)?;
            index_version_batch(&mut b, &ds.id, &v, &ver, seq);
            Ok((b, v.id))
        })?;
        self.version(&id)
    }

    /// Versions and drafts whose parents include `id`.
    pub fn dependents(&self, id: &VersionId) -> Result<Vec<String>> {
        dependents_in(&*self.store.reader(), id)
    }

    /// Tasks and models that reference a version (their parameters name
    /// it by id or version string, they read it, it holds their outputs,
    /// or a model was trained or evaluated on it).
    pub fn references(&self, v: &DatasetVersion) -> Result<Vec<String>> {
        crate::task::references_in(&*self.store.reader(), v)
    }

    /// Deletes a version from its dataset. Refuses, unless `force`, while
    /// other versions or drafts depend on it, or tasks or models reference
    /// it; the checks are made under the write lock, so a child or a task
    /// committed meanwhile counts. Without references its bytes become
    /// reclaimable by `gc`. With `force`, a referenced version leaves its
    /// dataset's line (not listed, not the latest, not resolved by name,
    /// version string or tag) but is kept — readable by id, a `gc` root —
    /// so the lineage of those tasks and models never points at nothing.
    pub fn delete(&self, v: &DatasetVersion, force: bool) -> Result<()> {
        // On a full disk this write may release the repository's reserve:
        // deleting (then gc) is how space is given back.
        self.write_freeing(|kv| {
            let cur = self.version_in_kv(kv, &v.id)?;
            if cur.deleted {
                return Err(Error::Invalid(format!(
                    "version {} was already deleted from {} (it is kept because tasks or models reference it)",
                    v.id.short(12),
                    cur.dataset.full_name()
                )));
            }
            let refs = crate::task::references_in(kv, &cur)?;
            if !refs.is_empty() && !force {
                return Err(Error::Referenced {
                    version: cur.label(),
                    by: refs,
                });
            }
            let deps = dependents_in(kv, &v.id)?;
            if !deps.is_empty() && !force {
                return Err(Error::DependedOn {
                    id: v.id.short(12),
                    children: deps,
                });
            }
            let mut b = Batch::default();
            self.store.delete_version_batch(kv, &v.id, &mut b)?;
            b.delete(
                Cf::App,
                keys::dataset_version(&cur.dataset.id, cur.created_ms, &v.id),
            );
            b.delete(
                Cf::App,
                keys::version_order(&cur.dataset.id, cur.seq, cur.created_ms, &v.id),
            );
            b.delete(
                Cf::App,
                keys::version_name(&cur.dataset.id, &cur.version, &v.id),
            );
            b.delete(Cf::App, keys::version_index(&v.id));
            if refs.is_empty() {
                b.delete(Cf::App, keys::version_meta(&v.id));
            } else {
                let info = version_info_in(kv, &cur.dataset.id, &v.id)?.ok_or_else(|| {
                    Error::corrupted(format!("version index {}", v.id), "entry missing")
                })?;
                let kept = KeptVersion {
                    dataset: cur.dataset.id,
                    info,
                    deleted_ms: dsv_store::store::now_ms(),
                    referenced_by: refs.clone(),
                };
                b.put(Cf::App, keys::kept_version(&v.id), to_json(&kept));
                // A porcelain gc root: kind 2 (version), its id.
                let mut root = vec![2u8];
                root.extend_from_slice(v.id.as_bytes());
                b.put(
                    Cf::Roots,
                    dsv_store::schema::root_app_key(&keys::kept_version(&v.id)),
                    root,
                );
            }
            let mut ev = EventWriter::sequenced();
            ev.push(
                &mut b,
                version_event(
                    EventKind::VersionDeleted,
                    &cur.dataset,
                    &v.id,
                    &cur.version,
                    &cur.tags,
                ),
            );
            Ok((b, ()))
        })
    }

    // ---- events -----------------------------------------------------------

    /// Events after sequence `after`, oldest first (at most `limit`).
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        crate::events::read_after(&*self.store.reader(), after, limit)
    }

    /// The last event's sequence number.
    pub fn last_event(&self) -> Result<u64> {
        crate::events::last_seq(&*self.store.reader())
    }
}

/// Whether `rel` lies in the excluded folder `skip` (the repository).
fn in_repo(skip: &Option<Vec<u8>>, rel: &[u8]) -> bool {
    match skip {
        Some(s) if !s.is_empty() => {
            rel.starts_with(s) && (rel.len() == s.len() || rel[s.len()] == b'/')
        }
        _ => false,
    }
}

/// Versions and drafts (not finalized) whose parents include `id`.
fn dependents_in(kv: &dyn KvRead, id: &VersionId) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    kv.scan(Cf::App, keys::DATASET_NAME, &mut |_, v| {
        ids.extend(DatasetId::from_slice(v));
        Ok(true)
    })?;
    let mut out = Vec::new();
    for ds_id in &ids {
        let ds = dataset_in(kv, ds_id)?;
        for (vid, info) in versions_in(kv, &ds.id)? {
            if info.parents.contains(id) {
                out.push(format!(
                    "{} ({}@{})",
                    vid.short(12),
                    ds.full_name(),
                    info.version
                ));
            }
        }
    }
    let mut drafts = Vec::new();
    kv.scan(Cf::Drafts, b"", &mut |k, v| {
        if let Some(did) = dsv_store::DraftId::from_slice(k) {
            drafts.push((did, dsv_store::schema::DraftRecord::decode(v, &did)?));
        }
        Ok(true)
    })?;
    for (did, rec) in drafts {
        if rec.finalized.is_none() && rec.parents.contains(id) {
            out.push(format!("draft {}", did.short(12)));
        }
    }
    Ok(out)
}
