//! The metadata seam's conformance suite (the same properties as
//! `dsv-store`'s, from its `tests/suite`) on PostgreSQL: a throwaway
//! cluster (initdb + pg_ctl as an unprivileged user on a free loopback
//! port, removed afterwards), one store per worker, each with its own
//! connections. Also: schema versions, refused credentials, an unreachable
//! server, and a change feed that survives a server restart.

#[path = "../../dsv-store/tests/suite/mod.rs"]
mod suite;

use std::time::Duration;

use dsv_pg::{PgKv, PgOptions};
use dsv_store::kv::{Backend, Batch, Cf};
use dsv_store::{Error, RepoConfig, Store};
use dsv_tests::PgCluster;
use suite::*;

fn pg_opts() -> PgOptions {
    PgOptions {
        password: Some(PgCluster::PASSWORD.into()),
        ..PgOptions::default()
    }
}

struct Pg {
    dir: tempfile::TempDir,
    url: String,
}

impl Pg {
    fn new(c: &PgCluster, db: &str) -> Self {
        c.create_db(db);
        let dir = tempfile::tempdir().unwrap();
        let url = c.url(db);
        Store::init_with_backend(
            &dir.path().join(".dsv"),
            RepoConfig::default(),
            Box::new(PgKv::connect(&url, &pg_opts()).unwrap()),
            opts(),
        )
        .unwrap();
        Pg { dir, url }
    }
}

impl Factory for Pg {
    fn open(&self) -> Store {
        Store::open_with_backend(
            &self.dir.path().join(".dsv"),
            Box::new(PgKv::connect(&self.url, &pg_opts()).unwrap()),
            opts(),
        )
        .unwrap()
    }
}

/// One cluster for the suite (each property on its own database).
#[test]
fn postgres_backend_conforms() {
    let cluster = PgCluster::start();
    no_lost_update(&Pg::new(&cluster, "lost"), 25);
    each_entry_once(&Pg::new(&cluster, "queue"), 200);
    claims_each_entry_once(&Pg::new(&cluster, "claims"), 300);
    snapshot_isolation(&Pg::new(&cluster, "snap"));
    ordered_scans(&Pg::new(&cluster, "scans"));
    change_feed(&Pg::new(&cluster, "feed"));
    // Scans longer than one page, both ways.
    let pg = Pg::new(&cluster, "pages");
    let store = pg.open();
    store
        .write(|_| {
            let mut b = Batch::default();
            for i in 0u32..1300 {
                b.put(
                    Cf::App,
                    [b"p/".as_slice(), &i.to_be_bytes()].concat(),
                    vec![],
                );
            }
            Ok((b, ()))
        })
        .unwrap();
    let (mut fwd, mut rev) = (Vec::new(), Vec::new());
    let kv = store.reader();
    kv.scan(Cf::App, b"p/", &mut |k, _| {
        fwd.push(k.to_vec());
        Ok(true)
    })
    .unwrap();
    kv.scan_rev(Cf::App, b"p/", b"", &mut |k, _| {
        rev.push(k.to_vec());
        Ok(true)
    })
    .unwrap();
    assert_eq!(fwd.len(), 1300);
    rev.reverse();
    assert_eq!(fwd, rev);
    assert!(fwd.windows(2).all(|w| w[0] < w[1]));

    // A view whose connection the server ends between two pages of a scan
    // (as it does to a view idle past its timeout) goes on from the last
    // key on a new snapshot: every key once, in order, both ways.
    let kv = PgKv::connect(
        &pg.url,
        &PgOptions {
            application_name: Some("dsv-view-test".into()),
            ..pg_opts()
        },
    )
    .unwrap();
    let view = kv.open_read().unwrap();
    let end_views = || {
        let o = cluster.psql(
            "pages",
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'dsv-view-test' AND state = 'idle in transaction'",
        );
        assert!(o.status.success());
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            "1",
            "the view was ended"
        );
    };
    let mut seen = Vec::new();
    view.scan(Cf::App, b"p/", &mut |k, _| {
        seen.push(k.to_vec());
        if seen.len() == 40 {
            end_views();
        }
        Ok(true)
    })
    .unwrap();
    assert_eq!(seen, fwd, "forward scan across an ended connection");
    let mut seen = Vec::new();
    view.scan_rev(Cf::App, b"p/", b"", &mut |k, _| {
        seen.push(k.to_vec());
        if seen.len() == 40 {
            end_views();
        }
        Ok(true)
    })
    .unwrap();
    seen.reverse();
    assert_eq!(seen, fwd, "reverse scan across an ended connection");
}

#[test]
fn schema_versions_credentials_and_outages_are_named() {
    let cluster = PgCluster::start();
    cluster.create_db("s");
    let url = cluster.url("s");
    let kv = PgKv::connect(&url, &pg_opts()).unwrap();
    // Connecting again migrates nothing and agrees.
    drop(PgKv::connect(&url, &pg_opts()).unwrap());
    let v = cluster.psql("s", "SELECT count(*), max(version) FROM dsv_schema");
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("{0}|{0}", dsv_pg::SCHEMA_VERSION),
        "migrated twice"
    );

    // Wrong password: named, not retried forever.
    let bad = PgOptions {
        password: Some("not-it".into()),
        ..PgOptions::default()
    };
    let e = PgKv::connect(&url, &bad).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Unavailable(_)), "{msg}");
    assert!(msg.contains("refused the credentials"), "{msg}");
    assert!(
        msg.contains(&format!("127.0.0.1:{}/s", cluster.port)),
        "{msg}"
    );
    assert!(
        !msg.contains(PgCluster::PASSWORD) && !msg.contains("not-it"),
        "{msg}"
    );

    // A missing database is named.
    let e = PgKv::connect(&cluster.url("nope"), &pg_opts()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");

    // A schema from a newer release is refused before anything is read.
    let o = cluster.psql(
        "s",
        "INSERT INTO dsv_schema (version, written_by) VALUES (99, 'dsv 9')",
    );
    assert!(o.status.success());
    match PgKv::connect(&url, &pg_opts()).unwrap_err() {
        Error::UnsupportedFormatVersion { found, .. } => assert_eq!(found, 99),
        e => panic!("expected a schema-version error, got {e}"),
    }
    let o = cluster.psql("s", "DELETE FROM dsv_schema WHERE version = 99");
    assert!(o.status.success());

    // The change feed survives a restart of the server: a commit after the
    // restart still wakes the listener.
    let mut feed = kv.change_source().unwrap();
    cluster.stop();
    let e = kv
        .transact(&mut |_| {
            let mut b = Batch::default();
            b.put(Cf::App, b"x".to_vec(), b"1".to_vec());
            Ok(b)
        })
        .unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("127.0.0.1:{}", cluster.port)),
        "{e}"
    );
    cluster.restart();
    let writer = PgKv::connect(&url, &pg_opts()).unwrap();
    // The listener reconnects by itself: after a few wake-ups of its own
    // (the lost connection, the new one), every commit wakes it promptly.
    let mut prompt = 0;
    for _ in 0..40 {
        writer
            .transact(&mut |_| {
                let mut b = Batch::default();
                b.put(Cf::App, b"y".to_vec(), b"1".to_vec());
                Ok(b)
            })
            .unwrap();
        let t = std::time::Instant::now();
        feed.wait(Duration::from_secs(2)).unwrap();
        prompt = if t.elapsed() < Duration::from_secs(2) {
            prompt + 1
        } else {
            0
        };
        if prompt >= 4 {
            break;
        }
    }
    assert!(
        prompt >= 4,
        "the change feed did not come back after the restart"
    );
    // The old pool reconnects too.
    kv.transact(&mut |_| {
        let mut b = Batch::default();
        b.put(Cf::App, b"x".to_vec(), b"2".to_vec());
        Ok(b)
    })
    .unwrap();
}

/// Commits stage their appends and counter bumps; a writer that dies
/// between its COMMIT and numbering them leaves them staged. They are
/// numbered by the next writer, or by the change feed's sweep when nothing
/// is notified — after the appends already numbered, gap-free.
#[test]
fn staged_work_left_by_a_dead_writer_is_numbered() {
    let cluster = PgCluster::start();
    let pg = Pg::new(&cluster, "stage");
    let store = pg.open();
    let append = |store: &Store, v: &[u8]| {
        store
            .write(|_| {
                let mut b = Batch::default();
                b.append((Cf::App, b"t/seq"), Cf::App, b"log/".to_vec(), v.to_vec());
                Ok((b, ()))
            })
            .unwrap();
    };
    let log = |store: &Store| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        store
            .reader()
            .scan(Cf::App, b"log/", &mut |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
        out
    };
    let key = |n: u64| [b"log/".as_slice(), &n.to_be_bytes()].concat();
    let counter =
        |store: &Store| dsv_store::txn::counter_in(&*store.reader(), Cf::App, b"t/seq").unwrap();
    // A write returns with its append numbered.
    append(&store, b"a");
    assert_eq!(log(&store), vec![(key(1), b"a".to_vec())]);
    let staged = || {
        let o = cluster.psql("stage", "SELECT count(*) FROM dsv_stage");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(staged(), "0");
    // What a writer that died after its COMMIT leaves: a staged append to
    // `t/seq` (app family 8), value "b".
    let leave = || {
        let o = cluster.psql(
            "stage",
            "INSERT INTO dsv_stage (s_cf, s_k, s_lk, a_cf, a_p, a_v, bump, bump_lk) VALUES \
             (ARRAY[8]::smallint[], ARRAY['\\x742f736571'::bytea], ARRAY[0]::bigint[], \
              ARRAY[8]::smallint[], ARRAY['\\x6c6f672f'::bytea], ARRAY['\\x62'::bytea], \
              ARRAY[]::bytea[], ARRAY[]::bigint[])",
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    leave();
    assert_eq!(staged(), "1");
    // Not numbered yet: the log does not show it.
    store.refresh().unwrap();
    assert_eq!(log(&store).len(), 1);
    // The next writer numbers it (staged first, so first), then its own.
    append(&store, b"c");
    store.refresh().unwrap();
    assert_eq!(
        log(&store),
        vec![
            (key(1), b"a".to_vec()),
            (key(2), b"b".to_vec()),
            (key(3), b"c".to_vec())
        ]
    );
    assert_eq!(counter(&store), 3);
    assert_eq!(staged(), "0");
    // With no writer, a change-feed wait that nothing wakes sweeps it up.
    leave();
    let kv = PgKv::connect(&pg.url, &pg_opts()).unwrap();
    let mut feed = kv.change_source().unwrap();
    // (The feed wakes once when it starts listening: changes before that
    // were not seen.)
    for _ in 0..3 {
        feed.wait(Duration::from_millis(200)).unwrap();
        if staged() == "0" {
            break;
        }
    }
    assert_eq!(staged(), "0");
    store.refresh().unwrap();
    assert_eq!(log(&store).last().unwrap(), &(key(4), b"b".to_vec()));
    assert_eq!(counter(&store), 4);
}
