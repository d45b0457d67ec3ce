//! The repository's event log: every porcelain mutation appends events in
//! the same atomic write as the change, numbered by a gap-free sequence.
//! Triggers consume it from a stored cursor, so they are exactly-once and
//! see everything that happened while they were not running.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use dsv_store::{Batch, Cf, KvRead};

use crate::error::{Error, Result};
use crate::keys;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A dataset was created.
    DatasetCreated,
    /// A dataset was renamed or moved to another project.
    DatasetRenamed,
    /// A version was finalized (by finalize, sync, watch or squash).
    VersionFinalized,
    /// A version's tags changed.
    VersionTagged,
    /// A version's metadata or description changed.
    VersionMetadata,
    /// A version was deleted.
    VersionDeleted,
    /// A task changed status (`extra.task`, `extra.status`; project/name are the task's).
    TaskStatus,
    /// A model was stored (`extra.model`, `extra.task`).
    ModelCreated,
    /// A model's tags changed (`extra.model`; `tags`, `tags_added`, `tags_removed`).
    ModelTagged,
    /// A pull placed versions of this repository that the remote did not
    /// have after the versions it brought (their finalize order moved,
    /// and a version string the remote had taken was renumbered).
    VersionRebased,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log (1, 2, …; no gaps).
    pub seq: u64,
    /// When, ms since the epoch.
    pub time_ms: i64,
    /// What happened.
    pub kind: EventKind,
    /// Dataset id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Project at the time of the event.
    #[serde(default)]
    pub project: String,
    /// Name at the time of the event.
    #[serde(default)]
    pub name: String,
    /// Version id, when about a version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// Version string, when about a version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version's tags after the event.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Tags added by this event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags_added: Vec<String>,
    /// Tags removed by this event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags_removed: Vec<String>,
    /// Anything else (old names, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Event {
    /// A new event of `kind` (sequence and time are set when appended).
    pub fn new(kind: EventKind) -> Self {
        Event {
            seq: 0,
            time_ms: 0,
            kind,
            dataset: None,
            project: String::new(),
            name: String::new(),
            version_id: None,
            version: None,
            tags: Vec::new(),
            tags_added: Vec::new(),
            tags_removed: Vec::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// Appends events to a batch, numbering them after the last stored one.
pub struct EventWriter {
    next: u64,
}

impl EventWriter {
    /// Starts after the last sequence number visible in `kv` (read inside
    /// the write lock, so numbers never collide).
    pub fn new(kv: &dyn KvRead) -> Result<Self> {
        Ok(Self {
            next: last_seq(kv)? + 1,
        })
    }

    /// Adds `ev` to `b`; returns its sequence number.
    pub fn push(&mut self, b: &mut Batch, mut ev: Event) -> u64 {
        ev.seq = self.next;
        if ev.time_ms == 0 {
            ev.time_ms = dsv_store::store::now_ms();
        }
        b.put(Cf::App, keys::event(ev.seq), crate::records::to_json(&ev));
        b.put(Cf::App, keys::EVENT_SEQ, ev.seq.to_le_bytes().to_vec());
        self.next += 1;
        ev.seq
    }
}

/// The last sequence number written (0 when the log is empty).
pub fn last_seq(kv: &dyn KvRead) -> Result<u64> {
    match kv.get(Cf::App, keys::EVENT_SEQ)? {
        None => Ok(0),
        Some(v) => {
            Ok(u64::from_le_bytes(v.as_slice().try_into().map_err(
                |_| Error::corrupted("event sequence", "bad length"),
            )?))
        }
    }
}

/// Events after `after`, oldest first, at most `limit`.
pub fn read_after(kv: &dyn KvRead, after: u64, limit: usize) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    let start = keys::event(after.saturating_add(1));
    let mut err = None;
    kv.scan_from(Cf::App, keys::EVENT, &start, &mut |_, v| {
        match crate::records::from_json::<Event>(v, "event") {
            Ok(e) => out.push(e),
            Err(e) => {
                err = Some(e);
                return Ok(false);
            }
        }
        Ok(out.len() < limit)
    })?;
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
