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
