//! The porcelain's keys in the engine's `app` column family — one place,
//! mirrored in `docs/FORMAT.md`. Values are JSON documents (self-describing,
//! forward-compatible: unknown fields are ignored); sequence numbers and
//! times in keys are big-endian so that keys sort by them.
//!
//! | key | value |
//! |---|---|
//! | `ds/` · dataset id [16] | [`DatasetRecord`](crate::records::DatasetRecord) |
//! | `dn/` · project · 0x00 · name | dataset id [16] |
//! | `dv/` · dataset id [16] · created ms u64 BE · version id [32] | [`VersionInfo`](crate::records::VersionInfo) |
//! | `vi/` · version id [32] | dataset id [16] · created ms u64 BE |
//! | `vm/` · version id [32] | [`VersionMeta`](crate::records::VersionMeta) (mutable: description, user metadata) |
//! | `dr/` · draft id [32] | [`DraftInfo`](crate::records::DraftInfo) |
//! | `ev/` · sequence u64 BE | [`Event`](crate::events::Event) |
//! | `sq/events` | last event sequence, u64 LE |
//! | `tk/` · task id (32 hex) | [`Task`](crate::task::Task) |
//! | `tq/` · queue · 0x00 · queued ms u64 BE · task id | empty: the queue, oldest first |
//! | `tl/` · task id · chunk u32 BE | console log text (UTF-8), in order |
//! | `md/` · model id (32 hex) | [`Model`](crate::task::Model) |
//! | `mb/` · model id (32 hex) | the serialized model (the trainer's JSON) |
//! | `ts/` · status · 0x00 · created ms u64 BE · task id | empty: tasks by status, oldest first |
//! | `tp/` · project · 0x00 · created ms u64 BE · task id | empty: tasks by project, oldest first |
//! | `mp/` · project · 0x00 · created ms u64 BE · model id | empty: models by project, oldest first |
//! | `mt/` · tag · 0x00 · created ms u64 BE · model id | empty: models by tag, oldest first |
//! | `ag/` · agent id (32 hex) | [`AgentPresence`](crate::agents::AgentPresence) |
//!
//! The four secondary indexes (`ts/`, `tp/`, `mp/`, `mt/`) are written in
//! the same batch as the record they index, by one function per record
//! kind (see [`crate::index`]); [`crate::index::backfill_indexes`] builds
//! them from the records (the upgrade of a repository written before they
//! existed) and [`crate::index::index_problems`] checks them.

use dsv_store::{DraftId, VersionId};

use crate::records::DatasetId;

/// Prefix of dataset records.
pub const DATASET: &[u8] = b"ds/";
/// Prefix of the name index.
pub const DATASET_NAME: &[u8] = b"dn/";
/// Prefix of the per-dataset version index.
pub const DATASET_VERSION: &[u8] = b"dv/";
/// Prefix of version → dataset.
pub const VERSION_INDEX: &[u8] = b"vi/";
/// Prefix of mutable version metadata.
pub const VERSION_META: &[u8] = b"vm/";
/// Versions deleted with `--force` and kept for the tasks and models that
/// reference them: `vk/` · version id → [`crate::records::KeptVersion`].
pub const KEPT_VERSION: &[u8] = b"vk/";
/// Prefix of dataset drafts.
pub const DRAFT: &[u8] = b"dr/";
/// Prefix of events.
pub const EVENT: &[u8] = b"ev/";
/// The event sequence counter.
pub const EVENT_SEQ: &[u8] = b"sq/events";

/// Prefix of agent presence records.
pub const AGENT: &[u8] = b"ag/";

/// Prefix of tasks.
pub const TASK: &[u8] = b"tk/";
/// Prefix of queues.
pub const QUEUE: &[u8] = b"tq/";
/// Prefix of task logs.
pub const TASK_LOG: &[u8] = b"tl/";
/// Prefix of model records.
pub const MODEL: &[u8] = b"md/";
/// Prefix of model bodies.
pub const MODEL_BODY: &[u8] = b"mb/";
/// Prefix of the tasks-by-status index.
pub const TASK_BY_STATUS: &[u8] = b"ts/";
/// Prefix of the tasks-by-project index.
pub const TASK_BY_PROJECT: &[u8] = b"tp/";
/// Prefix of the models-by-project index.
pub const MODEL_BY_PROJECT: &[u8] = b"mp/";
/// Prefix of the models-by-tag index.
pub const MODEL_BY_TAG: &[u8] = b"mt/";
/// Every secondary index prefix.
pub const INDEXES: [&[u8]; 4] = [
    TASK_BY_STATUS,
    TASK_BY_PROJECT,
    MODEL_BY_PROJECT,
    MODEL_BY_TAG,
];

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `ds/` key.
pub fn dataset(id: &DatasetId) -> Vec<u8> {
    cat(&[DATASET, &id.0])
}

/// `dn/` key.
pub fn dataset_name(project: &str, name: &str) -> Vec<u8> {
    cat(&[DATASET_NAME, project.as_bytes(), &[0], name.as_bytes()])
}

/// Prefix of one dataset's versions.
pub fn dataset_versions(id: &DatasetId) -> Vec<u8> {
    cat(&[DATASET_VERSION, &id.0])
}

/// `dv/` key.
pub fn dataset_version(id: &DatasetId, created_ms: i64, v: &VersionId) -> Vec<u8> {
    cat(&[
        DATASET_VERSION,
        &id.0,
        &(created_ms.max(0) as u64).to_be_bytes(),
        v.as_bytes(),
    ])
}

/// `vi/` key.
pub fn version_index(v: &VersionId) -> Vec<u8> {
    cat(&[VERSION_INDEX, v.as_bytes()])
}

/// `vm/` key.
pub fn version_meta(v: &VersionId) -> Vec<u8> {
    cat(&[VERSION_META, v.as_bytes()])
}

/// `vk/` key: a version removed from its dataset by `delete --force`
/// and kept because tasks or models reference it.
pub fn kept_version(v: &VersionId) -> Vec<u8> {
    cat(&[KEPT_VERSION, v.as_bytes()])
}

/// Prefix of the versions of each dataset in finalize order (`dq/` · dataset
/// · has-seq byte · finalize seq u64 BE · created ms u64 BE · version id →
/// empty): the newest versions are the last keys, read without the rest.
pub const VERSION_ORDER: &[u8] = b"dq/";
/// Present when every version has its [`VERSION_ORDER`] entry (written at
/// init, or by the backfill of `dsv upgrade`); without it, readers read
/// every version of a dataset.
pub const VERSION_ORDER_COMPLETE: &[u8] = b"mk/version-order";

/// Prefix of one dataset's [`VERSION_ORDER`] entries.
pub fn version_orders(id: &DatasetId) -> Vec<u8> {
    cat(&[VERSION_ORDER, &id.0])
}

/// A [`VERSION_ORDER`] key.
pub fn version_order(id: &DatasetId, seq: Option<u64>, created_ms: i64, v: &VersionId) -> Vec<u8> {
    cat(&[
        VERSION_ORDER,
        &id.0,
        &[u8::from(seq.is_some())],
        &seq.unwrap_or(0).to_be_bytes(),
        &(created_ms.max(0) as u64).to_be_bytes(),
        v.as_bytes(),
    ])
}

/// Prefix of each dataset's versions by name (`vs/` · dataset · name key ·
/// version id → empty): a version string's lookup, its uniqueness check and
/// the highest semantic version (the next number) read a few keys, not every
/// version. The name key is [`version_name_key`].
pub const VERSION_NAME: &[u8] = b"vs/";
/// Present when every version has its [`VERSION_NAME`] entry (written at
/// init, or by the backfill of `dsv upgrade`); without it, readers read
/// every version of a dataset.
pub const VERSION_NAMES_COMPLETE: &[u8] = b"mk/version-names";

/// The name key of a version string: for a semantic version, `0x01` ·
/// major, minor, patch u64 BE · pre-release (no build metadata, no leading
/// `v`: strings of equal precedence share it, and the last `0x01` key holds
/// the highest major.minor.patch); otherwise `0x02` · the string.
pub fn version_name_key(version: &str) -> Vec<u8> {
    match crate::records::semver_of(version) {
        Some(v) => cat(&[
            &[1u8],
            &v.major.to_be_bytes(),
            &v.minor.to_be_bytes(),
            &v.patch.to_be_bytes(),
            v.pre.as_str().as_bytes(),
        ]),
        None => cat(&[&[2u8], version.as_bytes()]),
    }
}

/// Prefix of one dataset's [`VERSION_NAME`] entries whose name key starts
/// with `name_key` (callers check the exact length: key = prefix · 32-byte id).
pub fn version_names(id: &DatasetId, name_key: &[u8]) -> Vec<u8> {
    cat(&[VERSION_NAME, &id.0, name_key])
}

/// A [`VERSION_NAME`] key.
pub fn version_name(id: &DatasetId, version: &str, v: &VersionId) -> Vec<u8> {
    cat(&[
        VERSION_NAME,
        &id.0,
        &version_name_key(version),
        v.as_bytes(),
    ])
}

/// `dr/` key.
pub fn draft(d: &DraftId) -> Vec<u8> {
    cat(&[DRAFT, d.as_bytes()])
}

/// `ev/` key.
pub fn event(seq: u64) -> Vec<u8> {
    cat(&[EVENT, &seq.to_be_bytes()])
}

/// The part of an index key before the time and id: prefix · field · 0x00
/// (a scan of it lists one status, project or tag, oldest first).
pub fn index_group(prefix: &[u8], field: &str) -> Vec<u8> {
    cat(&[prefix, field.as_bytes(), &[0]])
}

/// An index key: prefix · field · 0x00 · created ms u64 BE · id.
pub fn index_entry(prefix: &[u8], field: &str, created_ms: i64, id: &str) -> Vec<u8> {
    cat(&[
        prefix,
        field.as_bytes(),
        &[0],
        &(created_ms.max(0) as u64).to_be_bytes(),
        id.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No key family's prefix starts another's: a scan of one family never
    /// walks another's keys (a `vs/` index once shared `dn/` with the
    /// dataset names, and listing datasets read every version).
    #[test]
    fn key_prefixes_are_disjoint() {
        let all: &[&[u8]] = &[
            DATASET,
            DATASET_NAME,
            DATASET_VERSION,
            VERSION_INDEX,
            VERSION_META,
            KEPT_VERSION,
            DRAFT,
            EVENT,
            EVENT_SEQ,
            AGENT,
            TASK,
            QUEUE,
            TASK_LOG,
            MODEL,
            MODEL_BODY,
            TASK_BY_STATUS,
            TASK_BY_PROJECT,
            MODEL_BY_PROJECT,
            MODEL_BY_TAG,
            VERSION_ORDER,
            VERSION_ORDER_COMPLETE,
            VERSION_NAME,
            VERSION_NAMES_COMPLETE,
        ];
        for (i, a) in all.iter().enumerate() {
            for (j, b) in all.iter().enumerate() {
                assert!(
                    i == j || !b.starts_with(a),
                    "{} is a prefix of {}",
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                );
            }
        }
    }
}
