//! Transactions, the change feed and write stalls: the semantics every
//! metadata backend carries (see `docs/ARCHITECTURE.md`, "The metadata
//! seam").
//!
//! - **Transactions.** [`Backend::transact`](crate::kv::Backend::transact)
//!   runs a body that reads the latest committed state and returns a
//!   [`Batch`]; the batch commits atomically only if nothing the body read
//!   changed meanwhile. A backend either serializes transactions (RocksDB:
//!   one process may open the database read-write, so it takes a lock of
//!   its own around each transaction) or runs them optimistically and
//!   validates the read set at commit ([`MemKv`](crate::kv::MemKv): every
//!   `get` and every scan the body made is replayed against the current
//!   state under the commit lock; any difference is a conflict). A conflict
//!   makes [`Store::write`](crate::Store::write) run the body again, with
//!   backoff, up to [`MAX_CONFLICT_RETRIES`] times, then fail with the
//!   retryable [`Error::Conflict`].
//! - **Snapshot reads.** [`Backend::open_read`](crate::kv::Backend::open_read)
//!   returns a point-in-time view on every backend: commits made after it was
//!   opened are invisible to it, in gets and scans alike.
//! - **Keyspace counters.** Every commit bumps, in the same atomic batch, a
//!   counter per *keyspace* it touched ([`keyspace_of`]): `meta` key
//!   `ks/` · name → u64 LE. They drive the change feed and let a reader ask
//!   "did anything in this keyspace change since I looked?" without reading
//!   the keyspace.
//! - **Change feed.** [`Store::subscribe`](crate::Store::subscribe) returns a
//!   [`Subscription`] whose `wait` returns as soon as a watched keyspace's
//!   counter moved (woken by the backend's [`ChangeSource`]: inotify on the
//!   RocksDB directory, a condition variable in memory), or after a bounded
//!   fallback poll.
//! - **Stalls.** A transaction that holds a serializing backend for longer
//!   than [`STALL_MIN_MS`] records the interval (`meta` key `stall/` · end ms
//!   BE → start ms LE). Nobody could write during it, so leases must not run
//!   out because of it: [`stalled_ms`] tells how much of an interval was
//!   stalled.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::kv::{Batch, Cf, KvRead, Op, Visitor};

/// How often a conflicting transaction is run again before
/// [`Error::Conflict`] is returned.
pub const MAX_CONFLICT_RETRIES: u32 = 64;

/// A lock hold longer than this is recorded as a write stall.
pub const STALL_MIN_MS: i64 = 1_000;

/// Stall records older than this are dropped by the next stall's write.
pub const STALL_KEEP_MS: i64 = 7 * 86_400_000;

/// `meta` key prefix of keyspace counters.
pub const KEYSPACE_PREFIX: &[u8] = b"ks/";

/// `meta` key prefix of write stalls.
pub const STALL_PREFIX: &[u8] = b"stall/";

/// The keyspace a key belongs to: the column family's name, and for the
/// `app` and `meta` families also the key's first segment up to and
/// including its first `/` (`app:tq/`, `app:ev/`, `meta:damaged/`).
/// Keyspace counters themselves belong to none (`None`).
pub fn keyspace_of(cf: Cf, key: &[u8]) -> Option<String> {
    match cf {
        Cf::App | Cf::Meta => {
            if cf == Cf::Meta && key.starts_with(KEYSPACE_PREFIX) {
                return None;
            }
            let seg = match key.iter().position(|&b| b == b'/') {
                Some(i) => &key[..=i],
                None => &key[..key.len().min(16)],
            };
            Some(format!("{}:{}", cf.name(), String::from_utf8_lossy(seg)))
        }
        _ => Some(cf.name().to_string()),
    }
}

/// The keyspace of `app` keys starting with `prefix` (e.g. `b"tq/"`).
pub fn app_keyspace(prefix: &[u8]) -> String {
    keyspace_of(Cf::App, prefix).unwrap_or_default()
}

/// The `meta` key of a keyspace's counter.
pub fn keyspace_counter_key(name: &str) -> Vec<u8> {
    [KEYSPACE_PREFIX, name.as_bytes()].concat()
}

/// A keyspace counter's value in `kv` (0 if never written).
pub fn keyspace_counter(kv: &dyn KvRead, name: &str) -> Result<u64> {
    counter_in(kv, Cf::Meta, &keyspace_counter_key(name))
}

/// A counter's committed value (u64 LE; 0 when absent or malformed) read
/// from `kv` by its column family and full key.
pub fn counter_in(kv: &dyn KvRead, cf: Cf, key: &[u8]) -> Result<u64> {
    Ok(kv
        .get(cf, key)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0))
}

/// A counter (u64 LE) in a column family, read by [`seal`]'s `current`.
pub type CounterRead<'a> = dyn FnMut(Cf, &[u8]) -> Result<u64> + 'a;

/// The counters [`seal`] will read for `batch`: the sequences of its
/// appends and the keyspace counters of every keyspace it writes (a
/// backend that reads them in one query first).
pub fn counters_of(batch: &Batch) -> Vec<(Cf, Vec<u8>)> {
    let mut out: std::collections::BTreeSet<(Cf, Vec<u8>)> = Default::default();
    let mut touch = |cf: Cf, k: &[u8]| {
        if let Some(ks) = keyspace_of(cf, k) {
            out.insert((Cf::Meta, keyspace_counter_key(&ks)));
        }
    };
    for op in &batch.ops {
        match op {
            Op::Put(cf, k, _) | Op::Delete(cf, k) => touch(*cf, k),
            Op::Append {
                seq, cf, prefix, ..
            } => {
                touch(*cf, prefix);
                touch(seq.0, &seq.1);
            }
        }
    }
    for op in &batch.ops {
        if let Op::Append { seq, .. } = op {
            out.insert(seq.clone());
        }
    }
    out.into_iter().collect()
}

/// Turns every [`Op::Append`] of `batch` into a put at the next number of
/// its sequence, and puts each sequence's new counter. The base of a
/// sequence is the larger of its committed value (`current`) and any value
/// the batch itself puts there (a writer that numbered records by reading
/// the counter); appends follow in batch order. Called under the backend's
/// commit serialization.
pub fn resolve_appends(batch: &mut Batch, current: &mut CounterRead<'_>) -> Result<()> {
    if !batch.ops.iter().any(|op| matches!(op, Op::Append { .. })) {
        return Ok(());
    }
    let mut next: BTreeMap<(Cf, Vec<u8>), u64> = BTreeMap::new();
    for op in &batch.ops {
        if let Op::Append { seq, .. } = op {
            if !next.contains_key(seq) {
                let base = current(seq.0, &seq.1)?;
                next.insert(seq.clone(), base);
            }
        }
    }
    for op in &batch.ops {
        if let Op::Put(cf, k, v) = op {
            if let Some(n) = next.get_mut(&(*cf, k.clone())) {
                let put = <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_le_bytes)
                    .unwrap_or(0);
                *n = (*n).max(put);
            }
        }
    }
    let ops = std::mem::take(&mut batch.ops);
    for op in ops {
        match op {
            Op::Append {
                seq,
                cf,
                mut prefix,
                value,
            } => {
                let n = next.get_mut(&seq).expect("every sequence has a base");
                *n += 1;
                prefix.extend_from_slice(&n.to_be_bytes());
                batch.ops.push(Op::Put(cf, prefix, value));
            }
            other => batch.ops.push(other),
        }
    }
    for ((cf, key), n) in next {
        batch.ops.push(Op::Put(cf, key, n.to_le_bytes().to_vec()));
    }
    Ok(())
}

/// Resolves the appends of `batch` ([`resolve_appends`]) and adds the bumps
/// of the counters of every keyspace it writes. `current` reads a counter's
/// committed value; it is called under the backend's commit serialization,
/// so the bumps never conflict.
pub fn seal(batch: &mut Batch, current: &mut CounterRead<'_>) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    resolve_appends(batch, current)?;
    let mut touched: BTreeMap<String, ()> = BTreeMap::new();
    for op in &batch.ops {
        let (cf, k) = match op {
            Op::Put(cf, k, _) | Op::Delete(cf, k) => (*cf, k),
            Op::Append { .. } => unreachable!("appends were resolved"),
        };
        if let Some(ks) = keyspace_of(cf, k) {
            touched.insert(ks, ());
        }
    }
    for ks in touched.into_keys() {
        let key = keyspace_counter_key(&ks);
        let n = current(Cf::Meta, &key)?.wrapping_add(1);
        batch.put(Cf::Meta, key, n.to_le_bytes().to_vec());
    }
    Ok(())
}

/// `meta` key of a stall that ended at `end_ms`.
pub fn stall_key(end_ms: i64) -> Vec<u8> {
    [STALL_PREFIX, &(end_ms.max(0) as u64).to_be_bytes()].concat()
}

/// Adds a stall record `[start_ms, end_ms]` to `batch` and drops records
/// older than [`STALL_KEEP_MS`] (read from `kv`).
pub fn record_stall(kv: &dyn KvRead, batch: &mut Batch, start_ms: i64, end_ms: i64) -> Result<()> {
    let mut old = Vec::new();
    kv.scan(
        Cf::Meta,
        STALL_PREFIX,
        &mut |k, _| match k[STALL_PREFIX.len()..].try_into().map(u64::from_be_bytes) {
            Ok(end) if (end as i64) < end_ms - STALL_KEEP_MS => {
                old.push(k.to_vec());
                Ok(true)
            }
            _ => Ok(false),
        },
    )?;
    for k in old {
        batch.delete(Cf::Meta, k);
    }
    // Another stall ending in the same millisecond: keep the longer.
    let start = match kv.get(Cf::Meta, &stall_key(end_ms))? {
        Some(v) => <[u8; 8]>::try_from(v.as_slice())
            .map(i64::from_le_bytes)
            .map_or(start_ms, |s| s.min(start_ms)),
        None => start_ms,
    };
    batch.put(
        Cf::Meta,
        stall_key(end_ms),
        start.max(0).to_le_bytes().to_vec(),
    );
    Ok(())
}

/// The recorded stalls that ended at or after `from_ms`, as
/// `(start_ms, end_ms)`, oldest first.
pub fn stalls_since(kv: &dyn KvRead, from_ms: i64) -> Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    kv.scan_from(Cf::Meta, STALL_PREFIX, &stall_key(from_ms), &mut |k, v| {
        let end = k[STALL_PREFIX.len()..]
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Error::corrupted("stall record", "bad key length"))?;
        let start = <[u8; 8]>::try_from(v)
            .map(i64::from_le_bytes)
            .map_err(|_| Error::corrupted("stall record", "bad value length"))?;
        out.push((start, end as i64));
        Ok(true)
    })?;
    Ok(out)
}

/// Longest time a stall still counts after it ended ([`stalled_ms`]).
pub const STALL_DRAIN_MAX_MS: i64 = 10_000;

/// How many milliseconds of `[from_ms, to_ms]` nobody could count on
/// writing: the recorded stalls, each extended past its end by its own
/// length (at most [`STALL_DRAIN_MAX_MS`]) — the writers queued behind a
/// long transaction need time to get through once it ends, and a lease
/// holder's renewal is one of them. Overlaps count once.
pub fn stalled_ms(kv: &dyn KvRead, from_ms: i64, to_ms: i64) -> Result<i64> {
    let from = from_ms.saturating_sub(STALL_DRAIN_MAX_MS);
    let drained: Vec<(i64, i64)> = stalls_since(kv, from)?
        .into_iter()
        .map(|(s, e)| (s, e.saturating_add((e - s).clamp(0, STALL_DRAIN_MAX_MS))))
        .collect();
    Ok(overlap_ms(&drained, from_ms, to_ms))
}

/// The total length of the union of `intervals` clipped to `[from, to]`.
pub fn overlap_ms(intervals: &[(i64, i64)], from: i64, to: i64) -> i64 {
    let mut clipped: Vec<(i64, i64)> = intervals
        .iter()
        .map(|&(s, e)| (s.max(from), e.min(to)))
        .filter(|(s, e)| s < e)
        .collect();
    clipped.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(i64, i64)> = None;
    for (s, e) in clipped {
        match &mut cur {
            Some((_, ce)) if s <= *ce => *ce = (*ce).max(e),
            _ => {
                if let Some((cs, ce)) = cur {
                    total += ce - cs;
                }
                cur = Some((s, e));
            }
        }
    }
    if let Some((cs, ce)) = cur {
        total += ce - cs;
    }
    total
}

/// What woke a waiter: the backend's signal that something may have
/// committed. Spurious wake-ups are allowed.
pub trait ChangeSource: Send {
    /// Waits up to `timeout` for a commit (by any process) after the
    /// previous call.
    fn wait(&mut self, timeout: Duration) -> Result<()>;
}

/// Longest sleep of a [`Subscription`] between two checks of its counters
/// when no wake-up comes (a change the backend's source missed).
pub const FALLBACK_POLL: Duration = Duration::from_secs(2);

/// A waiter on changes of some keyspaces ([`crate::Store::subscribe`]).
pub struct Subscription<'a> {
    store: &'a crate::Store,
    source: Box<dyn ChangeSource>,
    keyspaces: Vec<String>,
    seen: Vec<u64>,
    poll: Duration,
}

impl<'a> Subscription<'a> {
    pub(crate) fn new(
        store: &'a crate::Store,
        source: Box<dyn ChangeSource>,
        keyspaces: Vec<String>,
    ) -> Result<Self> {
        // The source exists before the baseline is read: a commit between
        // the two is seen as a change, never missed.
        let mut s = Self {
            store,
            source,
            keyspaces,
            seen: Vec::new(),
            poll: FALLBACK_POLL,
        };
        s.seen = s.counters()?;
        Ok(s)
    }

    /// Sets the fallback poll interval (default [`FALLBACK_POLL`]).
    pub fn with_fallback_poll(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// The keyspaces watched.
    pub fn keyspaces(&self) -> &[String] {
        &self.keyspaces
    }

    fn counters(&self) -> Result<Vec<u64>> {
        self.store.refresh()?;
        let kv = self.store.reader();
        self.keyspaces
            .iter()
            .map(|k| keyspace_counter(&*kv, k))
            .collect()
    }

    /// Waits until a watched keyspace changed since the subscription was
    /// made or `wait` last returned `true`, at most `timeout`. Returns
    /// whether something changed; the store's read view is fresh after it.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let now = self.counters()?;
            if now != self.seen {
                self.seen = now;
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            self.source.wait(left.min(self.poll))?;
        }
    }
}

/// One read a transaction made, kept to validate it at commit.
#[derive(Debug, Clone)]
pub enum ReadRecord {
    /// A point read and what it returned.
    Get {
        /// Column family.
        cf: Cf,
        /// Key.
        key: Vec<u8>,
        /// The value read (`None`: absent).
        value: Option<Vec<u8>>,
    },
    /// A scan and what it saw.
    Scan {
        /// Column family.
        cf: Cf,
        /// Key prefix.
        prefix: Vec<u8>,
        /// Start (forward) or exclusive upper bound (reverse); empty: none.
        bound: Vec<u8>,
        /// Descending.
        reverse: bool,
        /// The entries visited, in order.
        seen: Vec<(Vec<u8>, Vec<u8>)>,
        /// Whether the scan ran to the end of its range (so an entry
        /// added anywhere in it changes the result).
        complete: bool,
    },
}

/// A reader that records what it read (for optimistic validation).
pub struct Recording<'a> {
    pub(crate) inner: &'a dyn KvRead,
    pub(crate) log: std::sync::Mutex<Vec<ReadRecord>>,
}

impl<'a> Recording<'a> {
    /// Records the reads made through `inner`.
    pub fn new(inner: &'a dyn KvRead) -> Self {
        Self {
            inner,
            log: std::sync::Mutex::new(Vec::new()),
        }
    }
    /// The reads made, in order.
    pub fn into_reads(self) -> Vec<ReadRecord> {
        self.log.into_inner().unwrap_or_else(|p| p.into_inner())
    }
    fn push(&self, r: ReadRecord) {
        match self.log.lock() {
            Ok(mut l) => l.push(r),
            Err(p) => p.into_inner().push(r),
        }
    }
    fn scan_rec(
        &self,
        cf: Cf,
        prefix: &[u8],
        bound: &[u8],
        reverse: bool,
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        let mut seen = Vec::new();
        let mut complete = true;
        let mut wrapped = |k: &[u8], v: &[u8]| -> Result<bool> {
            seen.push((k.to_vec(), v.to_vec()));
            let more = visit(k, v)?;
            if !more {
                complete = false;
            }
            Ok(more)
        };
        let r = if reverse {
            self.inner.scan_rev(cf, prefix, bound, &mut wrapped)
        } else {
            self.inner.scan_from(cf, prefix, bound, &mut wrapped)
        };
        // Recorded also when it failed (what it saw so far): an error that
        // came from a stale read must be seen as a conflict.
        self.push(ReadRecord::Scan {
            cf,
            prefix: prefix.to_vec(),
            bound: bound.to_vec(),
            reverse,
            seen,
            complete: complete && r.is_ok(),
        });
        r
    }
}

impl KvRead for Recording<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let value = self.inner.get(cf, key)?;
        self.push(ReadRecord::Get {
            cf,
            key: key.to_vec(),
            value: value.clone(),
        });
        Ok(value)
    }
    fn scan_from(
        &self,
        cf: Cf,
        prefix: &[u8],
        start: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        self.scan_rec(cf, prefix, start, false, visit)
    }
    fn scan_rev(
        &self,
        cf: Cf,
        prefix: &[u8],
        before: &[u8],
        visit: &mut Visitor<'_>,
    ) -> Result<()> {
        self.scan_rec(cf, prefix, before, true, visit)
    }
}

/// The first read in `reads` whose result differs in `now`, described for
/// the conflict error; `None` when every read still holds.
pub fn first_conflict(reads: &[ReadRecord], now: &dyn KvRead) -> Result<Option<String>> {
    for r in reads {
        match r {
            ReadRecord::Get { cf, key, value } => {
                if now.get(*cf, key)? != *value {
                    return Ok(Some(format!(
                        "{}:{}",
                        cf.name(),
                        String::from_utf8_lossy(key)
                    )));
                }
            }
            ReadRecord::Scan {
                cf,
                prefix,
                bound,
                reverse,
                seen,
                complete,
            } => {
                // The scan must see the same items again, and (if it ran to
                // the end) nothing more.
                let want = seen.len() + usize::from(*complete);
                let mut got: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(want);
                let mut take = |k: &[u8], v: &[u8]| -> Result<bool> {
                    got.push((k.to_vec(), v.to_vec()));
                    Ok(got.len() < want)
                };
                if want > 0 {
                    if *reverse {
                        now.scan_rev(*cf, prefix, bound, &mut take)?;
                    } else {
                        now.scan_from(*cf, prefix, bound, &mut take)?;
                    }
                }
                if got != *seen {
                    return Ok(Some(format!(
                        "{} scan of {}",
                        cf.name(),
                        String::from_utf8_lossy(prefix)
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Backoff before the `try_no`-th retry of a conflicting transaction:
/// exponential from 1 ms to 64 ms, with jitter so that contenders spread.
pub fn conflict_backoff(try_no: u32) -> Duration {
    let base = 1u64 << try_no.min(6);
    let jitter = {
        use std::hash::{BuildHasher, Hasher};
        // Random keys per `RandomState` (seeded from the OS): enough to
        // spread contenders apart.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(try_no);
        h.finish() % (base * 1000 + 1)
    };
    Duration::from_micros(base * 500 + jitter / 2)
}
