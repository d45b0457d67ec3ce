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
    /// Position in the log (1, 2, …; no gaps). Stored in the record's key;
    /// a record appended before the backend numbered it has none of its own.
    #[serde(default, skip_serializing_if = "is_zero")]
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

/// Appends events to a batch.
///
/// Two ways: [`EventWriter::new`] numbers them in the transaction after the
/// last stored number (the caller needs the number: a version records the
/// sequence number of its finalize event), which makes the transaction read
/// the log's counter, so it conflicts with every concurrent event writer;
/// [`EventWriter::sequenced`] leaves the numbering to the metadata backend
/// at commit ([`dsv_store::kv::Op::Append`]), so that busy writers (agents
/// starting and finishing tasks) never conflict on the log. Both give the
/// same gap-free sequence.
pub struct EventWriter {
    /// The next number, when numbering in the transaction.
    next: Option<u64>,
}

impl EventWriter {
    /// Numbers events after the last sequence number visible in `kv` (the
    /// transaction conflicts if another writer appended meanwhile).
    pub fn new(kv: &dyn KvRead) -> Result<Self> {
        Ok(Self {
            next: Some(last_seq(kv)? + 1),
        })
    }

    /// Leaves the numbering to the backend at commit.
    pub fn sequenced() -> Self {
        Self { next: None }
    }

    /// Adds `ev` to `b`.
    pub fn push(&mut self, b: &mut Batch, ev: Event) {
        match self.next {
            Some(seq) => {
                let mut ev = stamped(ev);
                ev.seq = seq;
                b.put(Cf::App, keys::event(seq), crate::records::to_json(&ev));
                b.put(Cf::App, keys::EVENT_SEQ, seq.to_le_bytes().to_vec());
                self.next = Some(seq + 1);
            }
            None => {
                let ev = stamped(ev);
                b.append(
                    (Cf::App, keys::EVENT_SEQ),
                    Cf::App,
                    keys::EVENT,
                    crate::records::to_json(&ev),
                );
            }
        }
    }

    /// Adds `ev` to `b` and returns its sequence number (a writer made by
    /// [`EventWriter::new`]; one made by [`EventWriter::sequenced`] cannot
    /// know the number before the commit).
    pub fn push_numbered(&mut self, b: &mut Batch, ev: Event) -> Result<u64> {
        let Some(seq) = self.next else {
            return Err(Error::Invalid(
                "internal: an event number was asked of a sequenced event writer".into(),
            ));
        };
        let mut ev = stamped(ev);
        ev.seq = seq;
        b.put(Cf::App, keys::event(ev.seq), crate::records::to_json(&ev));
        b.put(Cf::App, keys::EVENT_SEQ, ev.seq.to_le_bytes().to_vec());
        self.next = Some(seq + 1);
        Ok(seq)
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn stamped(mut ev: Event) -> Event {
    if ev.time_ms == 0 {
        ev.time_ms = dsv_store::store::now_ms();
    }
    ev
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

/// The event stored at `k` (`ev/` · seq): its record, numbered by the key
/// (an appended event's record was written before the backend numbered it).
pub(crate) fn decode(k: &[u8], v: &[u8]) -> Result<Event> {
    let mut e = crate::records::from_json::<Event>(v, "event")?;
    if let Ok(b) = <[u8; 8]>::try_from(&k[keys::EVENT.len()..]) {
        e.seq = u64::from_be_bytes(b);
    }
    Ok(e)
}

/// Events after `after`, oldest first, at most `limit`.
pub fn read_after(kv: &dyn KvRead, after: u64, limit: usize) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    let start = keys::event(after.saturating_add(1));
    let mut err = None;
    kv.scan_from(Cf::App, keys::EVENT, &start, &mut |k, v| {
        match decode(k, v) {
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
