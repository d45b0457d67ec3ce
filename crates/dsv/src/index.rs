//! Secondary indexes of tasks and models, so that hot paths (an agent's
//! reaping, `task list --status`, the gate's lookup of the production
//! model) read the records they need instead of every record.
//!
//! | index | key | maintained from |
//! |---|---|---|
//! | tasks by status | `ts/` · status · 0x00 · created ms BE · task id | [`Task::status`] |
//! | tasks by project | `tp/` · project · 0x00 · created ms BE · task id | [`Task::project`] |
//! | models by project | `mp/` · project · 0x00 · created ms BE · model id | [`Model::project`] |
//! | models by tag | `mt/` · tag · 0x00 · created ms BE · model id | each of [`Model::tags`] |
//!
//! Values are empty. Every write of a task or model record goes through
//! [`put_task`] / [`put_model`], which compute the index entries of the old
//! and the new record and write the difference in the same batch: no write
//! path can forget an index. [`backfill_indexes`] builds (and repairs) them
//! from the records; [`index_problems`] lists what differs.

use std::collections::BTreeSet;

use dsv_store::{Batch, Cf, KvRead};

use crate::error::{Error, Result};
use crate::keys;
use crate::records::{from_json, scan_json, to_json};
use crate::task::{Model, Task};

/// The index entries of a task.
pub(crate) fn task_entries(t: &Task) -> Vec<Vec<u8>> {
    vec![
        keys::index_entry(keys::TASK_BY_STATUS, t.status.as_str(), t.created_ms, &t.id),
        keys::index_entry(keys::TASK_BY_PROJECT, &t.project, t.created_ms, &t.id),
    ]
}

/// The index entries of a model.
pub(crate) fn model_entries(m: &Model) -> Vec<Vec<u8>> {
    let mut out = vec![keys::index_entry(
        keys::MODEL_BY_PROJECT,
        &m.project,
        m.created_ms,
        &m.id,
    )];
    for tag in &m.tags {
        let k = keys::index_entry(keys::MODEL_BY_TAG, tag, m.created_ms, &m.id);
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

/// Deletes the entries of `old` that `new` does not have, then puts every
/// entry of `new` (puts are idempotent; an entry missing for any reason is
/// restored by the next write of its record).
fn write_entries(b: &mut Batch, old: Vec<Vec<u8>>, new: Vec<Vec<u8>>) {
    for k in old {
        if !new.contains(&k) {
            b.delete(Cf::App, k);
        }
    }
    for k in new {
        b.put(Cf::App, k, Vec::new());
    }
}

/// Writes task `new` (whose stored record was `old`, `None` for a new
/// task) with its index entries. The only way task records are written.
pub(crate) fn put_task(b: &mut Batch, old: Option<&Task>, new: &Task) {
    write_entries(
        b,
        old.map(task_entries).unwrap_or_default(),
        task_entries(new),
    );
    b.put(
        Cf::App,
        [keys::TASK, new.id.as_bytes()].concat(),
        to_json(new),
    );
}

/// Writes model `new` (whose stored record was `old`, `None` for a new
/// model) with its index entries. The only way model records are written.
pub(crate) fn put_model(b: &mut Batch, old: Option<&Model>, new: &Model) {
    write_entries(
        b,
        old.map(model_entries).unwrap_or_default(),
        model_entries(new),
    );
    b.put(
        Cf::App,
        [keys::MODEL, new.id.as_bytes()].concat(),
        to_json(new),
    );
}

/// The ids listed under `group` (an [`keys::index_group`]), oldest first.
pub(crate) fn ids_in(kv: &dyn KvRead, group: &[u8]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    kv.scan(Cf::App, group, &mut |k, _| {
        if let Some(id) = k.get(group.len() + 8..) {
            out.push(String::from_utf8_lossy(id).into_owned());
        }
        Ok(true)
    })?;
    Ok(out)
}

/// Loads the records an index group lists, oldest first. An entry whose
/// record is missing is a damaged index, named with its key.
pub(crate) fn records_in<T: serde::de::DeserializeOwned>(
    kv: &dyn KvRead,
    group: &[u8],
    record_prefix: &[u8],
    what: &str,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for id in ids_in(kv, group)? {
        match kv.get(Cf::App, &[record_prefix, id.as_bytes()].concat())? {
            Some(v) => out.push(from_json(&v, &format!("{what} {id}"))?),
            None => {
                return Err(Error::corrupted(
                    format!(
                        "index {}",
                        String::from_utf8_lossy(group).trim_end_matches('\0')
                    ),
                    format!("it lists {what} {id}, which does not exist (rebuild the indexes)"),
                ))
            }
        }
    }
    Ok(out)
}

/// Every index entry the records call for.
fn expected_entries(kv: &dyn KvRead) -> Result<BTreeSet<Vec<u8>>> {
    let mut want = BTreeSet::new();
    for t in scan_json(kv, keys::TASK, "task", |_: &Task| true)? {
        want.extend(task_entries(&t));
    }
    for m in scan_json(kv, keys::MODEL, "model", |_: &Model| true)? {
        want.extend(model_entries(&m));
    }
    Ok(want)
}

/// Every index entry present.
fn present_entries(kv: &dyn KvRead) -> Result<BTreeSet<Vec<u8>>> {
    let mut have = BTreeSet::new();
    for p in keys::INDEXES {
        kv.scan(Cf::App, p, &mut |k, _| {
            have.insert(k.to_vec());
            Ok(true)
        })?;
    }
    Ok(have)
}

/// The batch that makes the secondary indexes exactly what the task and
/// model records call for: puts the missing entries and deletes the stale
/// ones. Empty when they are right. The upgrade of a repository written
/// before the indexes existed applies it once (in one atomic write); it is
/// idempotent. A record that does not decode is an error naming it.
pub fn backfill_indexes(kv: &dyn KvRead) -> Result<Batch> {
    let want = expected_entries(kv)?;
    let have = present_entries(kv)?;
    let mut b = Batch::default();
    for k in have.difference(&want) {
        b.delete(Cf::App, k.clone());
    }
    for k in want.difference(&have) {
        b.put(Cf::App, k.clone(), Vec::new());
    }
    Ok(b)
}

/// What is wrong with the secondary indexes, one line per entry (missing
/// or stale), for `fsck`; empty when they match the records.
pub fn index_problems(kv: &dyn KvRead) -> Result<Vec<String>> {
    let want = expected_entries(kv)?;
    let have = present_entries(kv)?;
    let show = |k: &[u8]| -> String {
        k.iter()
            .map(|&c| {
                if c.is_ascii_graphic() {
                    (c as char).to_string()
                } else {
                    format!("\\x{c:02x}")
                }
            })
            .collect()
    };
    let mut out: Vec<String> = want
        .difference(&have)
        .map(|k| format!("missing index entry {}", show(k)))
        .collect();
    out.extend(
        have.difference(&want)
            .map(|k| format!("stale index entry {}", show(k))),
    );
    Ok(out)
}

impl crate::repo::Repo {
    /// [`index_problems`] of this repository (for `fsck`).
    pub fn index_problems(&self) -> Result<Vec<String>> {
        index_problems(&*self.store().reader())
    }

    /// Rebuilds the secondary indexes from the records in one write (the
    /// upgrade, `fsck --repair`); returns how many entries it put or
    /// deleted (0 when they were right). Computed inside the write, so a
    /// concurrent task or model change cannot slip between.
    pub fn rebuild_indexes(&self) -> Result<usize> {
        self.write(|kv| {
            let b = backfill_indexes(kv)?;
            let n = b.ops.len();
            Ok((b, n))
        })
    }
}
