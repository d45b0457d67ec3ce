//! The metadata seam's conformance suite: every backend must pass it
//! (RocksDB and in-memory here; a server backend adds itself the same way).
//!
//! - no lost update on a counter under concurrent transactions (threads, and
//!   for RocksDB processes);
//! - each queue entry dequeued exactly once by 8 competing workers;
//! - snapshot isolation of a long reader;
//! - ordered scans in both directions;
//! - change-feed wake-ups for the watched keyspace only;
//! - typed, retryable conflicts; write stalls recorded.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dsv_store::kv::{Backend, Batch, Cf, KvRead, KvWrite, MemKv};
use dsv_store::{txn, Error, RepoConfig, Store};

mod suite;

use suite::*;

struct Mem {
    kv: MemKv,
    dir: tempfile::TempDir,
}

impl Mem {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kv = MemKv::new();
        Store::init_with_backend(
            &dir.path().join(".dsv"),
            RepoConfig::default(),
            Box::new(kv.clone()),
            opts(),
        )
        .unwrap();
        Mem { kv, dir }
    }
}

impl Factory for Mem {
    fn open(&self) -> Store {
        Store::open_with_backend(
            &self.dir.path().join(".dsv"),
            Box::new(self.kv.clone()),
            opts(),
        )
        .unwrap()
    }
}

struct Rocks {
    dir: tempfile::TempDir,
}

impl Rocks {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Store::init(&dir.path().join(".dsv"), RepoConfig::default(), opts()).unwrap();
        Rocks { dir }
    }
    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join(".dsv")
    }
}

impl Factory for Rocks {
    fn open(&self) -> Store {
        Store::open(&self.path(), opts()).unwrap()
    }
}

#[test]
fn mem_no_lost_update() {
    no_lost_update(&Mem::new(), 50);
}

#[test]
fn mem_each_entry_once() {
    each_entry_once(&Mem::new(), 400);
}

#[test]
fn mem_claims_each_entry_once() {
    claims_each_entry_once(&Mem::new(), 200);
}

#[test]
fn rocks_claims_each_entry_once() {
    claims_each_entry_once(&Rocks::new(), 60);
}

#[test]
fn mem_snapshot_isolation() {
    snapshot_isolation(&Mem::new());
}

#[test]
fn mem_ordered_scans() {
    ordered_scans(&Mem::new());
}

#[test]
fn mem_change_feed() {
    change_feed(&Mem::new());
}

#[test]
fn rocks_no_lost_update_threads() {
    no_lost_update(&Rocks::new(), 10);
}

#[test]
fn rocks_each_entry_once_threads() {
    each_entry_once(&Rocks::new(), 120);
}

#[test]
fn rocks_snapshot_isolation() {
    snapshot_isolation(&Rocks::new());
}

#[test]
fn rocks_ordered_scans() {
    ordered_scans(&Rocks::new());
}

#[test]
fn rocks_change_feed() {
    change_feed(&Rocks::new());
}

/// A conflict that never resolves ends in a typed, retryable error after
/// the bounded retries, and writes nothing.
#[test]
fn mem_endless_conflict_is_typed_and_retryable() {
    let m = Mem::new();
    let store = m.open();
    let rogue = m.kv.clone();
    let mut runs = 0;
    let err = store
        .write(|kv| {
            runs += 1;
            let v = kv.get(Cf::App, b"c/x")?;
            // Another writer changes what this transaction read.
            let mut b = Batch::default();
            b.put(Cf::App, b"c/x".to_vec(), runs.to_string().into_bytes());
            rogue.write(b)?;
            let mut mine = Batch::default();
            mine.put(Cf::App, b"c/mine".to_vec(), format!("{v:?}").into_bytes());
            Ok((mine, ()))
        })
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(runs, txn::MAX_CONFLICT_RETRIES);
    assert!(err.to_string().contains("app:c/x"), "{err}");
    store.refresh().unwrap();
    assert_eq!(store.reader().get(Cf::App, b"c/mine").unwrap(), None);
}

/// A transaction that holds the RocksDB backend for long records a stall
/// covering its hold; short ones record none.
#[test]
fn rocks_long_hold_is_recorded_as_stall() {
    let r = Rocks::new();
    let store = r.open();
    let before = dsv_store::store::now_ms();
    store.write(|_| Ok((Batch::default(), ()))).unwrap();
    assert!(store.stalls_since(before).unwrap().is_empty());
    store
        .write(|_| {
            // The hold under test (not synchronization).
            std::thread::sleep(Duration::from_millis(txn::STALL_MIN_MS as u64 + 200));
            Ok((Batch::default(), ()))
        })
        .unwrap();
    let after = dsv_store::store::now_ms();
    store.refresh().unwrap();
    let stalls = store.stalls_since(before).unwrap();
    assert_eq!(stalls.len(), 1, "{stalls:?}");
    let (s, e) = stalls[0];
    assert!(
        before <= s && e <= after && e - s > txn::STALL_MIN_MS,
        "{stalls:?}"
    );
    // The stall counts, and for as long again after it ended (the writers
    // queued behind it drain), clipped to the window asked about.
    let counted = txn::stalled_ms(&*store.reader(), before, after).unwrap();
    assert!(
        e - s <= counted && counted <= after - before,
        "{counted} {stalls:?}"
    );
    assert_eq!(
        txn::stalled_ms(&*store.reader(), before, e + 100_000).unwrap(),
        2 * (e - s)
    );
    assert_eq!(
        txn::stalled_ms(&*store.reader(), e + 2 * (e - s), e + 100_000).unwrap(),
        0
    );
}

/// A process killed while it held the RocksDB backend (its holder line is
/// still in the lock file) stalled every writer from its start: the next
/// transaction records that.
#[test]
fn rocks_a_holder_killed_mid_hold_is_recorded_as_stall() {
    let r = Rocks::new();
    let store = r.open();
    let since_s = dsv_store::store::now_ms() / 1000 - 5;
    std::fs::write(
        r.path().join(dsv_store::lock::LOCK_FILE),
        format!("dsv gc (pid 4242, since unix time {since_s})\n"),
    )
    .unwrap();
    store.write(|_| Ok((Batch::default(), ()))).unwrap();
    store.refresh().unwrap();
    let stalls = store.stalls_since(since_s * 1000).unwrap();
    assert_eq!(stalls.len(), 1, "{stalls:?}");
    assert_eq!(stalls[0].0, since_s * 1000, "{stalls:?}");
    assert!(stalls[0].1 - stalls[0].0 >= 4_000, "{stalls:?}");
}

// ---- processes (RocksDB: the embedded backend's multi-process case) ----

const CHILD_ENV: &str = "DSV_CONFORMANCE_CHILD";

/// Runs the work of one child process (when started by a test below).
#[test]
#[ignore = "run as a child process by the process tests"]
fn child_worker() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let (what, n, path) = (
        parts.next().unwrap(),
        parts.next().unwrap().parse::<usize>().unwrap(),
        parts.next().unwrap(),
    );
    let store = Store::open(Path::new(path), opts()).unwrap();
    match what {
        "inc" => {
            let vals: Vec<String> = (0..n).map(|_| increment(&store).to_string()).collect();
            println!("VALUES {}", vals.join(","));
        }
        "deq" => {
            let mut keys = Vec::new();
            while let Some(k) = dequeue(&store, n) {
                keys.push(hex(&k));
            }
            println!("VALUES {}", keys.join(","));
        }
        other => panic!("unknown child work {other}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn run_children(what: &str, n: usize, path: &Path) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..WORKERS)
        .map(|w| {
            let arg = if what == "deq" { w } else { n };
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "child_worker",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{what}:{arg}:{}", path.display()))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut out = Vec::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "child failed: {o:?}");
        let text = String::from_utf8(o.stdout).unwrap();
        let line = text
            .lines()
            .find_map(|l| l.find("VALUES ").map(|i| &l[i + "VALUES ".len()..]))
            .unwrap_or_else(|| panic!("no values from child: {text}"));
        out.extend(line.split(',').filter(|s| !s.is_empty()).map(String::from));
    }
    out
}

#[test]
fn rocks_processes_no_lost_update() {
    let r = Rocks::new();
    let per = 10;
    let vals = run_children("inc", per, &r.path());
    let total = (WORKERS * per) as u64;
    let distinct: BTreeSet<u64> = vals.iter().map(|v| v.parse().unwrap()).collect();
    assert_eq!(
        distinct.len(),
        vals.len(),
        "two processes wrote the same value"
    );
    assert_eq!(distinct, (1..=total).collect::<BTreeSet<_>>());
    assert_eq!(get_u64(&*r.open().reader(), b"t/counter"), total);
}

#[test]
fn rocks_processes_each_entry_once() {
    let r = Rocks::new();
    let entries = 160;
    fill_queue(&r.open(), entries);
    let keys = run_children("deq", 0, &r.path());
    let distinct: BTreeSet<_> = keys.iter().collect();
    assert_eq!(distinct.len(), keys.len(), "an entry was dequeued twice");
    assert_eq!(distinct.len() as u64, entries);
}

/// The in-memory backend's snapshots are independent of later commits
/// even when taken through the backend directly.
#[test]
fn mem_backend_snapshot_is_point_in_time() {
    let kv = MemKv::new();
    let mut b = Batch::default();
    b.put(Cf::App, b"k".to_vec(), b"1".to_vec());
    kv.write(b).unwrap();
    let snap: Arc<dyn KvRead> = kv.open_read().unwrap();
    let mut b = Batch::default();
    b.put(Cf::App, b"k".to_vec(), b"2".to_vec());
    kv.transact(&mut |_| Ok(b.clone())).unwrap();
    assert_eq!(snap.get(Cf::App, b"k").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(
        kv.open_read()
            .unwrap()
            .get(Cf::App, b"k")
            .unwrap()
            .as_deref(),
        Some(&b"2"[..])
    );
}
