//! The properties every metadata backend must have (shared by the
//! conformance tests of `dsv-store` and of each server backend, which
//! include this file).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use dsv_store::kv::{Batch, Cf, KvRead};
use dsv_store::{txn, Error, Store, StoreOptions};

/// Concurrent workers in the properties.
pub const WORKERS: usize = 8;

/// Store options with a generous lock wait.
pub fn opts() -> StoreOptions {
    StoreOptions {
        lock_timeout: Duration::from_secs(120),
        ..StoreOptions::default()
    }
}

/// Opens one store per worker on a shared database.
pub trait Factory: Sync {
    /// A store on the shared database.
    fn open(&self) -> Store;
}

/// A little-endian counter in the app family.
pub fn get_u64(kv: &dyn KvRead, key: &[u8]) -> u64 {
    kv.get(Cf::App, key)
        .unwrap()
        .map(|v| u64::from_le_bytes(v.try_into().unwrap()))
        .unwrap_or(0)
}

/// One increment of `t/counter`; returns the value written. The pause
/// between read and write widens the window in which another writer can
/// slip in: without conflict detection, updates are lost.
pub fn increment(store: &Store) -> u64 {
    store
        .write(|kv| {
            let n = get_u64(kv, b"t/counter") + 1;
            for _ in 0..200 {
                std::thread::yield_now();
            }
            let mut b = Batch::default();
            b.put(Cf::App, b"t/counter".to_vec(), n.to_le_bytes().to_vec());
            Ok((b, n))
        })
        .unwrap()
}

/// Takes the first queue entry; returns its key, or `None` when empty.
pub fn dequeue(store: &Store, worker: usize) -> Option<Vec<u8>> {
    store
        .write(|kv| {
            let mut first = None;
            kv.scan(Cf::App, b"q/", &mut |k, _| {
                first = Some(k.to_vec());
                Ok(false)
            })?;
            let mut b = Batch::default();
            if let Some(k) = &first {
                if kv
                    .get(Cf::App, &[b"taken/".as_slice(), k].concat())?
                    .is_some()
                {
                    return Err(Error::Invalid(format!("{k:?} taken twice")));
                }
                b.delete(Cf::App, k.clone());
                b.put(
                    Cf::App,
                    [b"taken/".as_slice(), k].concat(),
                    worker.to_le_bytes().to_vec(),
                );
            }
            Ok((b, first))
        })
        .unwrap()
}

/// Fills the queue.
pub fn fill_queue(store: &Store, n: u64) {
    store
        .write(|_| {
            let mut b = Batch::default();
            for i in 0..n {
                b.put(
                    Cf::App,
                    [b"q/".as_slice(), &i.to_be_bytes()].concat(),
                    vec![],
                );
            }
            Ok((b, ()))
        })
        .unwrap();
}

/// No lost update.
pub fn no_lost_update(f: &dyn Factory, per_worker: usize) {
    let seen: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..WORKERS)
            .map(|_| {
                s.spawn(|| {
                    let store = f.open();
                    (0..per_worker)
                        .map(|_| increment(&store))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let total = (WORKERS * per_worker) as u64;
    let distinct: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "two transactions wrote the same value"
    );
    assert_eq!(distinct, (1..=total).collect::<BTreeSet<_>>());
    let store = f.open();
    assert_eq!(get_u64(&*store.reader(), b"t/counter"), total);
}

/// Each entry once.
pub fn each_entry_once(f: &dyn Factory, entries: u64) {
    fill_queue(&f.open(), entries);
    let taken: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..WORKERS)
            .map(|w| {
                s.spawn(move || {
                    let store = f.open();
                    let mut mine = Vec::new();
                    while let Some(k) = dequeue(&store, w) {
                        mine.push(k);
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let distinct: BTreeSet<_> = taken.iter().cloned().collect();
    assert_eq!(distinct.len(), taken.len(), "an entry was dequeued twice");
    assert_eq!(distinct.len() as u64, entries, "entries lost");
    let store = f.open();
    let mut left = 0;
    store
        .reader()
        .scan(Cf::App, b"q/", &mut |_, _| {
            left += 1;
            Ok(true)
        })
        .unwrap();
    assert_eq!(left, 0);
}

/// Claims a `q/a/` or `q/b/` entry (the smaller id of the two firsts),
/// marks it taken and appends a log record naming it; returns its key.
pub fn claim_one(store: &Store, worker: usize) -> Option<Vec<u8>> {
    let prefixes = vec![b"q/a/".to_vec(), b"q/b/".to_vec()];
    store
        .claim(&prefixes, |kv, found| {
            let Some((k, _)) = found.iter().min_by_key(|(k, _)| k[4..].to_vec()) else {
                return Ok((Batch::default(), None));
            };
            let taken = [b"taken/".as_slice(), k].concat();
            if kv.get(Cf::App, &taken)?.is_some() {
                return Err(Error::Invalid(format!("{k:?} taken twice")));
            }
            let mut b = Batch::default();
            b.delete(Cf::App, k.clone());
            b.put(Cf::App, taken, worker.to_le_bytes().to_vec());
            b.append((Cf::App, b"t/seq"), Cf::App, b"log/".to_vec(), k.clone());
            Ok((b, Some(k.clone())))
        })
        .unwrap()
}

/// Removes a `q/a/` entry by a plain transaction (an "abort" racing the
/// claimers) and logs it by numbering the record itself (reading the
/// sequence's counter, as a writer that needs the number does); returns
/// the key removed.
pub fn remove_one(store: &Store, i: u64) -> Option<Vec<u8>> {
    let k = [b"q/a/".as_slice(), &i.to_be_bytes()].concat();
    store
        .write(|kv| {
            let mut b = Batch::default();
            if kv.get(Cf::App, &k)?.is_none() {
                return Ok((b, None));
            }
            let n = get_u64(kv, b"t/seq") + 1;
            b.delete(Cf::App, k.clone());
            b.put(Cf::App, [b"gone/".as_slice(), &k].concat(), vec![]);
            b.put(
                Cf::App,
                [b"log/".as_slice(), &n.to_be_bytes()].concat(),
                k.clone(),
            );
            b.put(Cf::App, b"t/seq".to_vec(), n.to_le_bytes().to_vec());
            Ok((b, Some(k.clone())))
        })
        .unwrap()
}

/// Claims: with `entries` in each of two queues, workers claiming while
/// one remover deletes entries of the first queue, every entry is either
/// claimed once or removed once, never both; and the log the claimers
/// append to (and the remover numbers by hand) holds one record per
/// entry, numbered 1, 2, … without a gap or an overwrite.
pub fn claims_each_entry_once(f: &dyn Factory, entries: u64) {
    let store = f.open();
    store
        .write(|_| {
            let mut b = Batch::default();
            for i in 0..entries {
                for q in [b"q/a/", b"q/b/"] {
                    b.put(Cf::App, [q.as_slice(), &i.to_be_bytes()].concat(), vec![]);
                }
            }
            Ok((b, ()))
        })
        .unwrap();
    let (claimed, removed): (Vec<Vec<u8>>, Vec<Vec<u8>>) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..WORKERS)
            .map(|w| {
                s.spawn(move || {
                    let store = f.open();
                    let mut mine = Vec::new();
                    while let Some(k) = claim_one(&store, w) {
                        mine.push(k);
                    }
                    mine
                })
            })
            .collect();
        let remover = s.spawn(|| {
            let store = f.open();
            (0..entries)
                .rev()
                .step_by(3)
                .filter_map(|i| remove_one(&store, i))
                .collect::<Vec<_>>()
        });
        let claimed = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        (claimed, remover.join().unwrap())
    });
    let c: BTreeSet<_> = claimed.iter().cloned().collect();
    let r: BTreeSet<_> = removed.iter().cloned().collect();
    assert_eq!(c.len(), claimed.len(), "an entry was claimed twice");
    assert!(c.is_disjoint(&r), "an entry was both claimed and removed");
    assert_eq!(c.len() + r.len(), 2 * entries as usize, "entries lost");
    let kv = store.reader();
    let mut log = Vec::new();
    kv.scan(Cf::App, b"log/", &mut |k, v| {
        log.push((u64::from_be_bytes(k[4..].try_into().unwrap()), v.to_vec()));
        Ok(true)
    })
    .unwrap();
    let total = 2 * entries;
    assert_eq!(
        log.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "the log is not numbered 1..{total} without gaps"
    );
    let logged: BTreeSet<_> = log.into_iter().map(|(_, v)| v).collect();
    assert_eq!(logged, c.union(&r).cloned().collect(), "log records lost");
    assert_eq!(get_u64(&*kv, b"t/seq"), total);
    let mut left = 0;
    kv.scan(Cf::App, b"q/", &mut |_, _| {
        left += 1;
        Ok(true)
    })
    .unwrap();
    assert_eq!(left, 0);
}

/// Snapshot isolation.
pub fn snapshot_isolation(f: &dyn Factory) {
    let store = f.open();
    let put = |k: &[u8], v: &[u8]| {
        let (k, v) = (k.to_vec(), v.to_vec());
        store
            .write(move |_| {
                let mut b = Batch::default();
                b.put(Cf::App, k.clone(), v.clone());
                Ok((b, ()))
            })
            .unwrap();
    };
    put(b"s/a", b"1");
    store.refresh().unwrap();
    let old = store.reader();
    put(b"s/a", b"2");
    put(b"s/b", b"new");
    let mut keys = Vec::new();
    old.scan(Cf::App, b"s/", &mut |k, v| {
        keys.push((k.to_vec(), v.to_vec()));
        Ok(true)
    })
    .unwrap();
    assert_eq!(
        keys,
        vec![(b"s/a".to_vec(), b"1".to_vec())],
        "old view moved"
    );
    assert_eq!(old.get(Cf::App, b"s/b").unwrap(), None);
    // Another worker's fresh view, and this store's own after its writes.
    for fresh in [f.open().reader(), store.reader()] {
        assert_eq!(
            fresh.get(Cf::App, b"s/a").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        assert_eq!(
            fresh.get(Cf::App, b"s/b").unwrap().as_deref(),
            Some(&b"new"[..])
        );
    }
}

/// Ordered scans.
pub fn ordered_scans(f: &dyn Factory) {
    let store = f.open();
    store
        .write(|_| {
            let mut b = Batch::default();
            for k in [
                &b"r/\x00"[..],
                b"r/a",
                b"r/b",
                b"r/b\xff",
                b"r/c",
                b"r\xff",
                b"r.",
                b"r0",
                b"\xff\xff",
                b"\xff\xff\x01",
            ] {
                b.put(Cf::App, k.to_vec(), k.to_vec());
            }
            Ok((b, ()))
        })
        .unwrap();
    let kv = store.reader();
    let collect = |prefix: &[u8], bound: &[u8], rev: bool| {
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut v = |k: &[u8], _: &[u8]| {
            out.push(k.to_vec());
            Ok(true)
        };
        if rev {
            kv.scan_rev(Cf::App, prefix, bound, &mut v).unwrap();
        } else {
            kv.scan_from(Cf::App, prefix, bound, &mut v).unwrap();
        }
        out
    };
    let r: Vec<Vec<u8>> = [&b"r/\x00"[..], b"r/a", b"r/b", b"r/b\xff", b"r/c"]
        .iter()
        .map(|k| k.to_vec())
        .collect();
    assert_eq!(collect(b"r/", b"", false), r);
    let mut rev = r.clone();
    rev.reverse();
    assert_eq!(collect(b"r/", b"", true), rev);
    assert_eq!(
        collect(b"r/", b"r/b", true),
        vec![b"r/a".to_vec(), b"r/\x00".to_vec()]
    );
    assert_eq!(collect(b"r/", b"r/b", false)[0], b"r/b".to_vec());
    assert_eq!(
        collect(b"\xff\xff", b"", true),
        vec![b"\xff\xff\x01".to_vec(), b"\xff\xff".to_vec()]
    );
    assert_eq!(
        kv.last(Cf::App, b"r/").unwrap().map(|(k, _)| k),
        Some(b"r/c".to_vec())
    );
    assert_eq!(kv.last(Cf::App, b"none/").unwrap(), None);
}

/// Change feed.
pub fn change_feed(f: &dyn Factory) {
    let store = f.open();
    let ks = txn::app_keyspace(b"q/");
    assert_eq!(ks, "app:q/");
    let mut sub = store.subscribe(std::slice::from_ref(&ks)).unwrap();
    let write = |key: &'static [u8]| {
        let other = f.open();
        other
            .write(|_| {
                let mut b = Batch::default();
                b.put(Cf::App, key.to_vec(), b"x".to_vec());
                Ok((b, ()))
            })
            .unwrap();
    };
    // A change elsewhere does not wake it.
    write(b"elsewhere/1");
    assert!(!sub.wait(Duration::from_millis(300)).unwrap());
    // A change by another writer in the watched keyspace does.
    std::thread::scope(|s| {
        s.spawn(|| write(b"q/1"));
        assert!(sub.wait(Duration::from_secs(60)).unwrap());
    });
    // The store's view is fresh after a wake-up.
    assert!(store.reader().get(Cf::App, b"q/1").unwrap().is_some());
    assert_eq!(txn::keyspace_counter(&*store.reader(), &ks).unwrap(), 1);
    assert!(txn::keyspace_counter(&*store.reader(), "app:elsewhere/").unwrap() >= 1);
}
