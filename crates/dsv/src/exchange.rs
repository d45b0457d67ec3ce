//! Versions crossing repositories (push, fetch, pull, clone): what a remote
//! is told about a dataset, and how versions that come from one are indexed
//! here. The transport (packs on object storage) is `dsv-remote`'s.
//!
//! A dataset keeps its id everywhere, so a dataset pushed from one
//! repository and fetched into another is the same dataset, whatever it is
//! called. Imported versions join their dataset in the remote's order; a
//! version made here that the remote did not have yet moves after them (a
//! rebase: its finalize order, and its version string when the remote's
//! versions took it), recorded as a `version_rebased` event.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use dsv_store::object::Object;
use dsv_store::store::{add_tag_batch, remove_tag_batch};
use dsv_store::{Batch, Cf, ObjectId, VersionId};

use crate::error::{Error, Result};
use crate::events::{Event, EventKind, EventWriter};
use crate::keys;
use crate::records::{to_json, DatasetId, DatasetRecord, VersionInfo, VersionMeta};
use crate::repo::{
    dataset_by_name_in, dataset_in, index_version_batch, next_version, version_event,
    version_meta_in, versions_in, Dataset, Repo,
};

/// What a remote records about a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetHeader {
    /// Its id (the same in every repository).
    pub id: DatasetId,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// Creation time, ms.
    pub created_ms: i64,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// What a remote records about a version besides its objects: the
/// dataset-level facts (version string, tags, description, metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionHeader {
    /// Version id.
    pub id: VersionId,
    /// Version string.
    pub version: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Description.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// User metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

impl VersionHeader {
    /// The mutable facts (tags, description, metadata) as one comparable value.
    pub fn mutable(&self) -> (BTreeSet<&str>, &str, &BTreeMap<String, serde_json::Value>) {
        (
            self.tags.iter().map(String::as_str).collect(),
            &self.description,
            &self.metadata,
        )
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ImportReport {
    /// The dataset was created here by the import.
    pub created_dataset: bool,
    /// Versions added: id and version string.
    pub imported: Vec<(VersionId, String)>,
    /// Local versions moved after the imported ones: id, old and new
    /// version string.
    pub rebased: Vec<(VersionId, String, String)>,
    /// Existing versions whose tags, description or metadata changed.
    pub updated: Vec<VersionId>,
}

impl Repo {
    /// The dataset with this id, if it exists here.
    pub fn dataset_by_id(&self, id: &DatasetId) -> Result<Option<Dataset>> {
        let kv = self.store().reader();
        if kv.get(Cf::App, &keys::dataset(id))?.is_none() {
            return Ok(None);
        }
        dataset_in(&*kv, id).map(Some)
    }

    /// A dataset as a remote records it.
    pub fn dataset_header(&self, ds: &Dataset) -> Result<DatasetHeader> {
        let kv = self.store().reader();
        let rec: DatasetRecord = match kv.get(Cf::App, &keys::dataset(&ds.id))? {
            Some(v) => crate::records::from_json(&v, &format!("dataset {}", ds.id))?,
            None => return Err(Error::DatasetNotFound(ds.full_name())),
        };
        Ok(DatasetHeader {
            id: ds.id,
            project: rec.project,
            name: rec.name,
            created_ms: rec.created_ms,
            description: rec.description,
        })
    }

    /// A dataset's versions as a remote records them, oldest first
    /// (finalize order).
    pub fn version_headers(&self, ds: &Dataset) -> Result<Vec<VersionHeader>> {
        let mut vs = self.versions(ds)?;
        vs.reverse();
        Ok(vs
            .into_iter()
            .map(|v| VersionHeader {
                id: v.id,
                version: v.version,
                tags: v.tags,
                description: v.description,
                metadata: v.metadata,
            })
            .collect())
    }

    /// Imports versions of a dataset in one atomic write: the objects they
    /// need (checked against their ids), the dataset (created with its
    /// remote id when it is new here), each version's index record, tags
    /// and metadata with a `version_finalized` event (so triggers fire for
    /// what a pull brings), in `incoming`'s order. Versions of this dataset
    /// that `remote_ids` lacks (made here, not pushed yet) move after the
    /// imported ones. `updates` set the tags, description and metadata of
    /// versions that exist here (merged by the caller). `extra` are `app`
    /// records the caller commits in the same write (its remote tracking).
    pub fn import(
        &self,
        header: &DatasetHeader,
        incoming: &[VersionHeader],
        remote_ids: &HashSet<VersionId>,
        objects: &[(ObjectId, Vec<u8>)],
        updates: &[VersionHeader],
        extra: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<ImportReport> {
        // Remote input is untrusted: names and version strings must be ones
        // this repository could have made.
        crate::rev::parse_dataset_name(&format!("{}/{}", header.project, header.name))?;
        for v in incoming {
            if v.version.is_empty()
                || v.version.len() > 100
                || v.version
                    .chars()
                    .any(|c| c.is_control() || c == '@' || c == '/')
            {
                return Err(Error::Invalid(format!(
                    "the remote's version {} of {}/{} has an invalid version string {:?}",
                    v.id.short(12),
                    header.project,
                    header.name,
                    v.version
                )));
            }
            for t in &v.tags {
                crate::rev::validate_tag(t)?;
            }
        }
        // The version objects among them, decoded (every object is checked
        // against its id by the engine when the batch is built).
        let wanted: HashSet<ObjectId> = incoming.iter().map(|v| ObjectId(v.id.0)).collect();
        let decoded: HashMap<ObjectId, Object> = objects
            .iter()
            .filter(|(id, _)| wanted.contains(id))
            .map(|(id, c)| {
                dsv_store::import::check_object(id, c, &format!("object {id}")).map(|o| (*id, o))
            })
            .collect::<dsv_store::Result<_>>()?;
        self.write(|kv| {
            let mut report = ImportReport::default();
            let mut b = Batch::default();
            let mut ev = EventWriter::new(kv)?;
            for (k, v) in extra {
                b.put(Cf::App, k.clone(), v.clone());
            }
            let ds = match kv.get(Cf::App, &keys::dataset(&header.id))? {
                Some(_) => dataset_in(kv, &header.id)?,
                None => {
                    if let Some(other) = dataset_by_name_in(kv, &header.project, &header.name)? {
                        return Err(Error::Invalid(format!(
                            "dataset {}/{} exists here with another id ({}, the remote's is {}): \
                             two repositories created it separately; rename this one \
                             ('dsv dataset rename {}/{} NEW') and fetch again",
                            header.project,
                            header.name,
                            other.id,
                            header.id,
                            header.project,
                            header.name
                        )));
                    }
                    let rec = DatasetRecord {
                        project: header.project.clone(),
                        name: header.name.clone(),
                        created_ms: header.created_ms,
                        description: header.description.clone(),
                    };
                    b.put(Cf::App, keys::dataset(&header.id), to_json(&rec));
                    b.put(
                        Cf::App,
                        keys::dataset_name(&header.project, &header.name),
                        header.id.0.to_vec(),
                    );
                    let mut e = Event::new(EventKind::DatasetCreated);
                    e.dataset = Some(header.id.to_string());
                    e.project = header.project.clone();
                    e.name = header.name.clone();
                    ev.push(&mut b, e);
                    report.created_dataset = true;
                    Dataset {
                        id: header.id,
                        project: header.project.clone(),
                        name: header.name.clone(),
                        created_ms: header.created_ms,
                    }
                }
            };
            self.store().import_objects_batch(kv, objects, &mut b)?;
            let mut local = versions_in(kv, &ds.id)?;
            local.sort_by_key(|(id, i)| (i.finalize_order(), *id.as_bytes()));
            let mut here: HashSet<VersionId> = local.iter().map(|(id, _)| *id).collect();
            let existing = here.clone();
            // Version strings the remote's versions hold.
            let mut taken: Vec<(VersionId, VersionInfo)> = local
                .iter()
                .filter(|(id, _)| remote_ids.contains(id))
                .cloned()
                .collect();
            let mut any_new = false;
            for v in incoming {
                // A document listing an id twice imports it once.
                if !here.insert(v.id) {
                    continue;
                }
                let object = match decoded.get(&ObjectId(v.id.0)) {
                    Some(Object::Version(o)) => o.clone(),
                    Some(_) => {
                        return Err(Error::corrupted(
                            format!("version {}", v.id),
                            "the remote's object is not a version",
                        ))
                    }
                    None => dsv_store::store::version_in(kv, &v.id)?.object,
                };
                if kv.get(Cf::App, &keys::version_index(&v.id))?.is_some() {
                    return Err(Error::Invalid(format!(
                        "version {} of {} belongs to another dataset here",
                        v.id.short(12),
                        ds.full_name()
                    )));
                }
                let version = dsv_store::Version { id: v.id, object };
                let seq = ev.push_numbered(
                    &mut b,
                    version_event(EventKind::VersionFinalized, &ds, &v.id, &v.version, &v.tags),
                )?;
                index_version_batch(&mut b, &ds.id, &version, &v.version, seq);
                self.store()
                    .import_version_root_batch(&v.id, version.object.created_ms, &mut b);
                for t in &v.tags {
                    add_tag_batch(&v.id, t, &mut b)?;
                }
                let meta = VersionMeta {
                    description: v.description.clone(),
                    metadata: v.metadata.clone(),
                };
                if meta != VersionMeta::default() {
                    b.put(Cf::App, keys::version_meta(&v.id), to_json(&meta));
                }
                taken.push((
                    v.id,
                    VersionInfo {
                        version: v.version.clone(),
                        parents: version.object.parents.clone(),
                        created_ms: version.object.created_ms,
                        file_count: version.object.file_count,
                        total_bytes: version.object.total_bytes,
                        delta: version.object.delta,
                        message: version.object.message.clone(),
                        seq: Some(seq),
                    },
                ));
                report.imported.push((v.id, v.version.clone()));
                any_new = true;
            }
            if any_new {
                // Versions made here and not pushed yet follow what the
                // remote had (a rebase), renumbered when their version
                // string is taken.
                for (id, info) in local.iter().filter(|(id, _)| !remote_ids.contains(id)) {
                    let old = info.version.clone();
                    let new = if taken
                        .iter()
                        .any(|(_, t)| crate::records::same_version(&t.version, &old))
                    {
                        next_version(&taken)
                    } else {
                        old.clone()
                    };
                    let mut e = version_event(EventKind::VersionRebased, &ds, id, &new, &[]);
                    e.extra
                        .insert("previous_version".into(), serde_json::json!(old));
                    let seq = ev.push_numbered(&mut b, e)?;
                    let version = dsv_store::store::version_in(kv, id)?;
                    b.delete(
                        Cf::App,
                        keys::version_order(&ds.id, info.seq, info.created_ms, id),
                    );
                    b.delete(Cf::App, keys::version_name(&ds.id, &old, id));
                    index_version_batch(&mut b, &ds.id, &version, &new, seq);
                    let mut info = info.clone();
                    info.version = new.clone();
                    info.seq = Some(seq);
                    taken.push((*id, info));
                    report.rebased.push((*id, old, new));
                }
            }
            for u in updates {
                if !existing.contains(&u.id) {
                    continue;
                }
                let before: BTreeSet<String> = dsv_store::store::tags_of_in(kv, &u.id)?
                    .into_iter()
                    .collect();
                let after: BTreeSet<String> = u.tags.iter().cloned().collect();
                for t in before.difference(&after) {
                    remove_tag_batch(&u.id, t, &mut b);
                }
                for t in after.difference(&before) {
                    add_tag_batch(&u.id, t, &mut b)?;
                }
                let meta = VersionMeta {
                    description: u.description.clone(),
                    metadata: u.metadata.clone(),
                };
                let old_meta = version_meta_in(kv, &u.id)?;
                if meta != old_meta {
                    b.put(Cf::App, keys::version_meta(&u.id), to_json(&meta));
                }
                if before != after || meta != old_meta {
                    let version = local
                        .iter()
                        .find(|(i, _)| i == &u.id)
                        .map(|(_, i)| i.version.clone())
                        .unwrap_or_default();
                    let after_v: Vec<String> = after.iter().cloned().collect();
                    if before != after {
                        let mut e =
                            version_event(EventKind::VersionTagged, &ds, &u.id, &version, &after_v);
                        e.tags_added = after.difference(&before).cloned().collect();
                        e.tags_removed = before.difference(&after).cloned().collect();
                        ev.push(&mut b, e);
                    }
                    if meta != old_meta {
                        ev.push(
                            &mut b,
                            version_event(
                                EventKind::VersionMetadata,
                                &ds,
                                &u.id,
                                &version,
                                &after_v,
                            ),
                        );
                    }
                    report.updated.push(u.id);
                }
            }
            Ok((b, report.clone()))
        })
    }
}
