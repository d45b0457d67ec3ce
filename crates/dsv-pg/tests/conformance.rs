//! The metadata seam's conformance on PostgreSQL: a throwaway cluster
//! (initdb + pg_ctl as uid 65534 on a free loopback port, removed after)
//! and the properties every backend must have — no lost update, each queue
//! entry once, ordered scans both ways (0xff prefixes too), snapshot
//! isolation, change-feed wake-ups.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use dsv_pg::PgKv;
use dsv_store::kv::{Backend, Batch, Cf, KvRead};
use dsv_store::{RepoConfig, Store, StoreOptions};

fn pg_bin() -> PathBuf {
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(o) if o.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        _ => PathBuf::from("/usr/lib/postgresql/15/bin"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway PostgreSQL cluster.
struct Cluster {
    root: tempfile::TempDir,
    port: u16,
}

fn as_nobody(bin: &PathBuf, prog: &str) -> Command {
    let root = unsafe_is_root();
    let mut c = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ]);
        c.arg(bin.join(prog));
        c
    } else {
        Command::new(bin.join(prog))
    };
    c.env_remove("PGDATA");
    c
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Cluster {
    fn start() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let bin = pg_bin();
        let root = tempfile::Builder::new().prefix("dsv-pg").tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = root.path().join("data");
        let sock = root.path().join("sock");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&sock).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        if unsafe_is_root() {
            for d in [&data, &sock] {
                let st = Command::new("chown")
                    .arg("65534:65534")
                    .arg(d)
                    .status()
                    .unwrap();
                assert!(st.success());
            }
        }
        let st = as_nobody(&bin, "initdb")
            .args(["-D", data.to_str().unwrap(), "-U", "dsv", "--auth=trust"])
            .args(["--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("initdb runs (PostgreSQL installed: .ci/run installs it)");
        assert!(st.success(), "initdb failed");
        for _ in 0..5 {
            let port = free_port();
            let st = as_nobody(&bin, "pg_ctl")
                .args(["-D", data.to_str().unwrap(), "-l"])
                .arg(sock.join("log"))
                .args(["-w", "-t", "30", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                     -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
                     -c max_pred_locks_per_transaction=256",
                    sock.display()
                ))
                .arg("start")
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            if st.success() {
                return Cluster { root, port };
            }
        }
        panic!("PostgreSQL did not start");
    }

    fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=dsv dbname=postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_nobody(&pg_bin(), "pg_ctl")
            .args(["-D", self.root.path().join("data").to_str().unwrap()])
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        lock_timeout: Duration::from_secs(120),
        ..StoreOptions::default()
    }
}

struct Repo {
    dir: tempfile::TempDir,
    url: String,
}

impl Repo {
    fn new(c: &Cluster) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = c.url();
        Store::init_with_backend(
            &dir.path().join(".dsv"),
            RepoConfig::default(),
            Box::new(PgKv::connect(&url).unwrap()),
            opts(),
        )
        .unwrap();
        Repo { dir, url }
    }
    /// One store per worker, each with its own connections.
    fn open(&self) -> Store {
        Store::open_with_backend(
            &self.dir.path().join(".dsv"),
            Box::new(PgKv::connect(&self.url).unwrap()),
            opts(),
        )
        .unwrap()
    }
}

fn get_u64(kv: &dyn KvRead, key: &[u8]) -> u64 {
    kv.get(Cf::App, key)
        .unwrap()
        .map(|v| u64::from_le_bytes(v.try_into().unwrap()))
        .unwrap_or(0)
}

#[test]
fn postgres_backend_conforms() {
    let cluster = Cluster::start();
    let repo = Repo::new(&cluster);

    // No lost update: 8 workers × 15 increments of one counter.
    let stores: Vec<Store> = (0..8).map(|_| repo.open()).collect();
    let mut written: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = stores
            .iter()
            .map(|st| {
                s.spawn(move || {
                    (0..15)
                        .map(|_| {
                            st.write(|kv| {
                                let n = get_u64(kv, b"t/counter") + 1;
                                let mut b = Batch::default();
                                b.put(Cf::App, b"t/counter".to_vec(), n.to_le_bytes().to_vec());
                                Ok((b, n))
                            })
                            .unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    written.sort_unstable();
    assert_eq!(written, (1..=120).collect::<Vec<u64>>(), "an update was lost");

    // Each queue entry dequeued exactly once by 8 workers.
    stores[0]
        .write(|_| {
            let mut b = Batch::default();
            for i in 0..80u32 {
                b.put(Cf::App, format!("q/{i:05}").into_bytes(), vec![1]);
            }
            Ok((b, ()))
        })
        .unwrap();
    let mut taken: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = stores
            .iter()
            .map(|st| {
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let got = st
                            .write(|kv| {
                                let mut first = None;
                                kv.scan(Cf::App, b"q/", &mut |k, _| {
                                    first = Some(k.to_vec());
                                    Ok(false)
                                })?;
                                let mut b = Batch::default();
                                if let Some(k) = &first {
                                    b.delete(Cf::App, k.clone());
                                }
                                Ok((b, first))
                            })
                            .unwrap();
                        match got {
                            Some(k) => mine.push(k),
                            None => return mine,
                        }
                    }
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    taken.sort();
    let expected: Vec<Vec<u8>> = (0..80u32)
        .map(|i| format!("q/{i:05}").into_bytes())
        .collect();
    assert_eq!(taken, expected, "an entry was dequeued twice or lost");

    // Ordered scans both ways, 0xff prefixes included.
    let st = &stores[0];
    st.write(|_| {
        let mut b = Batch::default();
        for k in [&b"s/a"[..], b"s/b", b"s/c", b"s0", b"\xff\xff1", b"\xff\xff2"] {
            b.put(Cf::App, k.to_vec(), k.to_vec());
        }
        Ok((b, ()))
    })
    .unwrap();
    let kv = st.reader();
    let mut fwd = Vec::new();
    kv.scan(Cf::App, b"s/", &mut |k, _| {
        fwd.push(k.to_vec());
        Ok(true)
    })
    .unwrap();
    assert_eq!(fwd, vec![b"s/a".to_vec(), b"s/b".to_vec(), b"s/c".to_vec()]);
    let mut rev = Vec::new();
    kv.scan_rev(Cf::App, b"s/", b"s/c", &mut |k, _| {
        rev.push(k.to_vec());
        Ok(true)
    })
    .unwrap();
    assert_eq!(rev, vec![b"s/b".to_vec(), b"s/a".to_vec()]);
    assert_eq!(
        kv.last(Cf::App, b"\xff\xff").unwrap().map(|(k, _)| k),
        Some(b"\xff\xff2".to_vec())
    );
    drop(kv);

    // Snapshot isolation: a view does not see later commits.
    let backend = PgKv::connect(&repo.url).unwrap();
    let view = backend.open_read().unwrap();
    let before = get_u64(&*view, b"t/counter");
    stores[1]
        .write(|kv| {
            let mut b = Batch::default();
            let n = get_u64(kv, b"t/counter") + 1;
            b.put(Cf::App, b"t/counter".to_vec(), n.to_le_bytes().to_vec());
            Ok((b, ()))
        })
        .unwrap();
    assert_eq!(get_u64(&*view, b"t/counter"), before);
    drop(view);
    assert_eq!(
        get_u64(&*backend.open_read().unwrap(), b"t/counter"),
        before + 1
    );

    // The change feed wakes a waiter on another connection (a commit after
    // the source was opened ends the wait, whenever the wait starts).
    let mut source = backend.change_source().unwrap();
    let waiter = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        source.wait(Duration::from_secs(20)).unwrap();
        t.elapsed()
    });
    stores[2]
        .write(|_| {
            let mut b = Batch::default();
            b.put(Cf::App, b"t/ping".to_vec(), vec![1]);
            Ok((b, ()))
        })
        .unwrap();
    let waited = waiter.join().unwrap();
    assert!(waited < Duration::from_secs(10), "no wake-up: {waited:?}");
}
