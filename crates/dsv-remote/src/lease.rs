//! Leases on a remote: how a push and a remote `gc` keep out of each
//! other's way on storage that only offers conditional writes.
//!
//! Every push writes an intent, `leases/push-HOLDER.json`, before it
//! uploads anything and removes it when done; a `gc` writes
//! `leases/gc-HOLDER.json`. Each then lists `leases/`: a push that sees a
//! live gc lease stops ("a gc of the remote is running"), a gc that sees a
//! live push (or another gc) stops. Because each writes its own lease
//! *before* listing, and the storage's listings show every write that
//! completed before them (S3 and the others are strongly consistent), of a
//! push and a gc that start at the same time at least one sees the other:
//! they never run together. That matters because a push skips every chunk
//! and object the remote already holds, even in a pack no dataset refers
//! to yet (the leftover of a killed push) — exactly what a gc deletes.
//!
//! A lease is live while its object's `Last-Modified` plus the lease's
//! `ttl_ms` lies ahead of the storage's clock; all times are the storage's
//! own (a lease holder's clock never matters). A thread rewrites the lease
//! every third of its ttl while the work runs, so a multi-hour push stays
//! live; a holder that dies stops renewing and its lease expires, and the
//! next gc removes it.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use dsv_store::storage::{PackStorage, PutMode};

use crate::error::{Error, Result};

/// Where leases live on a remote.
pub const LEASES: &str = "leases/";
/// A lease's time to live, ms.
pub const TTL_MS: i64 = 120_000;

/// What holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// A push (uploads packs, then publishes documents).
    Push,
    /// A remote gc (deletes packs nothing refers to).
    Gc,
}

impl LeaseKind {
    fn as_str(self) -> &'static str {
        match self {
            LeaseKind::Push => "push",
            LeaseKind::Gc => "gc",
        }
    }
}

/// A lease object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDoc {
    /// Push or gc.
    pub kind: LeaseKind,
    /// A random id of the holder.
    pub holder: String,
    /// The holder's host name (for messages).
    pub host: String,
    /// The holder's process id (for messages).
    pub pid: u32,
    /// The holder's boot id and pid namespace: a holder is judged gone by
    /// its pid only from the same boot and pid namespace.
    #[serde(default)]
    pub boot: String,
    /// Time to live after each renewal, ms.
    pub ttl_ms: i64,
}

/// A lease seen in a listing.
#[derive(Debug, Clone)]
pub struct SeenLease {
    /// Its object name.
    pub name: String,
    /// Its content (None when unreadable: judged by age alone).
    pub doc: Option<LeaseDoc>,
    /// Last renewal, by the storage's clock.
    pub modified_ms: i64,
}

impl SeenLease {
    /// Whether it is live at `now` (the storage's clock): renewed within
    /// its ttl, and not held by a process of this host that is gone (a
    /// push stopped with Ctrl-C does not hold up a gc for the ttl).
    pub fn live(&self, now: i64) -> bool {
        let ttl = self
            .doc
            .as_ref()
            .map_or(TTL_MS, |d| d.ttl_ms.clamp(0, 24 * 3_600_000));
        self.modified_ms + ttl > now && !self.holder_gone_here()
    }

    fn holder_gone_here(&self) -> bool {
        self.doc.as_ref().is_some_and(|d| {
            let here = boot_and_pidns();
            !here.is_empty()
                && d.boot == here
                && d.host == hostname()
                && d.pid != std::process::id()
                && !std::path::Path::new(&format!("/proc/{}", d.pid)).exists()
        })
    }

    /// "a push by host (pid N)" for messages.
    pub fn describe(&self) -> String {
        match &self.doc {
            Some(d) => format!("a {} by {} (pid {})", d.kind.as_str(), d.host, d.pid),
            None => format!("the lease {}", self.name),
        }
    }
}

/// `BOOT-ID/PID-NAMESPACE`, or empty when either is unknown.
fn boot_and_pidns() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if boot.is_empty() || ns.is_empty() {
        String::new()
    } else {
        format!("{boot}/{ns}")
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A held lease, handed to the work run under it.
#[derive(Debug)]
pub struct Held {
    /// This lease's object name.
    pub name: String,
    /// The storage's clock when the lease was first written, ms.
    pub started_ms: i64,
    /// The other leases live when it was taken.
    pub others: Vec<SeenLease>,
    lost: AtomicBool,
    renewed: AtomicI64,
    epoch: Instant,
    ttl_ms: i64,
}

impl Held {
    /// Before a step that makes earlier work visible (a push publishing
    /// its documents): the lease is healthy, and no live gc lease is listed
    /// (judged against this lease's last write, on the storage's clock).
    pub fn check_still_alone(&self, storage: &dyn PackStorage) -> Result<()> {
        let seen = list_leases(storage)?;
        let now = seen
            .iter()
            .find(|l| l.name == self.name)
            .map(|l| l.modified_ms);
        let gc_live = |now: i64| {
            seen.iter().any(|l| {
                l.name != self.name && l.name.starts_with(&format!("{LEASES}gc-")) && l.live(now)
            })
        };
        let alone = match now {
            Some(now) => !gc_live(now),
            // Our lease is gone: a gc judged it expired.
            None => false,
        };
        if !self.healthy() || !alone {
            return Err(Error::Busy {
                location: storage.location(),
                reason: "this push's lease lapsed or a gc started meanwhile; nothing was \
                         published — run the push again (what it uploaded is reused)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Whether the lease is surely still live: renewed within half its ttl
    /// and never failed to renew. Work that deletes checks it before each
    /// deletion.
    pub fn healthy(&self) -> bool {
        let since = self.epoch.elapsed().as_millis() as i64 - self.renewed.load(Ordering::Acquire);
        !self.lost.load(Ordering::Acquire) && since < self.ttl_ms / 2
    }
}

/// Lists the leases on a remote, with the storage's "now" when `own` is
/// among them (its modification time, just written).
pub fn list_leases(storage: &dyn PackStorage) -> Result<Vec<SeenLease>> {
    let listed = storage.list(LEASES)?;
    let mut out = Vec::with_capacity(listed.len());
    for l in listed {
        if !l.name.ends_with(".json") {
            continue;
        }
        let doc = storage
            .get(&l.name)?
            .and_then(|g| serde_json::from_slice::<LeaseDoc>(&g.data).ok());
        out.push(SeenLease {
            name: l.name,
            doc,
            modified_ms: l.modified_ms,
        });
    }
    Ok(out)
}

/// Runs `work` under a lease of `kind` on `storage`, renewing it meanwhile
/// and removing it afterwards. Refuses (without running `work`) when a
/// live lease the kind must not overlap with is held: a gc for a push; a
/// push or another gc for a gc.
pub fn with_lease<R>(
    storage: &dyn PackStorage,
    kind: LeaseKind,
    work: impl FnOnce(&Held) -> Result<R>,
) -> Result<R> {
    let holder = hex::encode(dsv_store::id::random_bytes::<8>()?);
    let name = format!("{LEASES}{}-{holder}.json", kind.as_str());
    let doc = LeaseDoc {
        kind,
        holder: holder.clone(),
        host: hostname(),
        pid: std::process::id(),
        ttl_ms: TTL_MS,
        boot: boot_and_pidns(),
    };
    let body = serde_json::to_vec_pretty(&doc).expect("a lease serializes");
    let first = storage.put(&name, body.clone(), PutMode::Overwrite)?;
    let etag = match first {
        dsv_store::storage::PutOutcome::Written(e) => e,
        _ => None,
    };
    let epoch = Instant::now();
    let outcome = (|| {
        let seen = list_leases(storage)?;
        let now = seen
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.modified_ms)
            .ok_or_else(|| Error::BadRemote {
                location: format!("{}/{name}", storage.location()),
                reason: "a lease just written is not listed; the storage's listings are not \
                         consistent with its writes, so a gc could delete what a push uses"
                    .into(),
            })?;
        let others: Vec<SeenLease> = seen
            .into_iter()
            .filter(|l| l.name != name && l.live(now))
            .collect();
        let kind_of = |l: &SeenLease| {
            l.doc.as_ref().map(|d| d.kind).or_else(|| {
                if l.name.starts_with(&format!("{LEASES}gc-")) {
                    Some(LeaseKind::Gc)
                } else if l.name.starts_with(&format!("{LEASES}push-")) {
                    Some(LeaseKind::Push)
                } else {
                    None
                }
            })
        };
        let blocking: Vec<&SeenLease> = others
            .iter()
            .filter(|l| match kind {
                LeaseKind::Push => kind_of(l) == Some(LeaseKind::Gc),
                LeaseKind::Gc => true,
            })
            .collect();
        if let Some(b) = blocking.first() {
            let what = match kind {
                LeaseKind::Push => "push",
                LeaseKind::Gc => "gc",
            };
            return Err(Error::Busy {
                location: storage.location(),
                reason: format!(
                    "{} is running ({} live lease(s) under {LEASES}); a {what} cannot run \
                     at the same time — try again when it ends (a lease of a process that \
                     died expires {} s after its last renewal)",
                    b.describe(),
                    blocking.len(),
                    TTL_MS / 1000
                ),
            });
        }
        // The others were judged against our lease's first write: that
        // judgement only holds while our lease is surely still live.
        if epoch.elapsed().as_millis() as i64 >= TTL_MS / 2 {
            return Err(Error::Busy {
                location: storage.location(),
                reason: "listing the leases took longer than half a lease's life; try again".into(),
            });
        }
        let held = Held {
            name: name.clone(),
            started_ms: now,
            others,
            lost: AtomicBool::new(false),
            renewed: AtomicI64::new(0),
            epoch,
            ttl_ms: TTL_MS,
        };
        let (stop, stopped) = channel::<()>();
        std::thread::scope(|s| {
            // Dropped when the work ends, also by a panic: the renewer stops.
            let stop = stop;
            let held = &held;
            let body = &body;
            let name = &name;
            let mut etag = etag;
            s.spawn(move || {
                let every = Duration::from_millis((TTL_MS / 3) as u64);
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let at = held.epoch.elapsed().as_millis() as i64;
                    // Only our own lease is renewed: one a gc removed as
                    // expired stays lost (the work must not go on as if
                    // it had been live all along).
                    let mode = match &etag {
                        Some(e) => PutMode::Update(e.clone()),
                        None => PutMode::Overwrite,
                    };
                    match storage.put(name, body.clone(), mode) {
                        Ok(dsv_store::storage::PutOutcome::Written(e)) => {
                            if e.is_some() {
                                etag = e;
                            }
                            held.renewed.store(at, Ordering::Release);
                        }
                        _ => {
                            held.lost.store(true, Ordering::Release);
                            break;
                        }
                    }
                }
            });
            let r = work(held);
            drop(stop);
            r
        })
    })();
    // Removed whatever happened; a failure to remove only delays others
    // until the lease expires.
    let _ = storage.delete(&name);
    outcome
}
