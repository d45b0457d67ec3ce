//! Remotes end to end: two repositories on one machine play two machines
//! around a real S3-compatible server (moto's, on a free loopback port) or
//! a folder: push, clone (lazy), pull, concurrent pushes, a killed push,
//! damaged and missing objects on the remote, dropped connections, and
//! bad input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use dsv_tests::{
    copy_files, files_under, flip_middle_byte, noise, occupancy_dir, stderr, stdout, FaultProxy,
    S3Server, Sandbox,
};

/// Runs dsv in `s` with test credentials (moto accepts any) and a HOME
/// without profile files.
fn run(s: &Sandbox, args: &[&str]) -> Output {
    s.cmd(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("HOME", s.dir.path())
        .env_remove("AWS_PROFILE")
        .output()
        .expect("dsv runs")
}

fn ok(s: &Sandbox, args: &[&str]) -> String {
    let out = run(s, args);
    assert!(
        out.status.success(),
        "dsv {args:?} failed ({:?}): {}{}",
        out.status.code(),
        stderr(&out),
        stdout(&out)
    );
    stdout(&out)
}

fn json(s: &Sandbox, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(s, &all)).expect("JSON")
}

/// A sandbox whose repository is a clone of `url` (made in `sandbox/repo`).
fn clone(url: &str, endpoint: Option<&str>, full: bool) -> Sandbox {
    let s = Sandbox::empty();
    let repo = s.repo();
    let mut args = vec!["clone", url, repo.to_str().unwrap()];
    if let Some(e) = endpoint {
        args.extend(["--endpoint", e]);
    }
    if full {
        args.push("--full");
    }
    ok(&s, &args);
    s
}

fn version_ids(s: &Sandbox, ds: &str) -> BTreeSet<String> {
    json(s, &["dataset", "list", ds])
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

fn fsck_json(s: &Sandbox, read_data: bool) -> serde_json::Value {
    let mut args = vec!["--json", "fsck"];
    if read_data {
        args.push("--read-data");
    }
    let out = run(s, &args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fsck JSON");
    assert!(
        out.status.success() && v["ok"] == true,
        "fsck: {v} {}",
        stderr(&out)
    );
    v
}

#[test]
fn push_clone_and_pull_through_s3_give_byte_identical_data() {
    let s3 = S3Server::start();
    s3.bucket("team");
    let ep = s3.endpoint();
    let url = "s3://team/datasets";

    // A: the labeling machine.
    let a = Sandbox::new();
    let data = a.path("data");
    copy_files(&occupancy_dir(), &data);
    ok(
        &a,
        &[
            "dataset",
            "sync",
            "lab/occupancy",
            data.to_str().unwrap(),
            "-m",
            "v1",
        ],
    );
    let add = json(&a, &["remote", "add", "origin", url, "--endpoint", &ep]);
    assert_eq!(add["empty"], true, "{add}");
    let p1 = json(&a, &["push"]);
    assert_eq!(p1["datasets"][0]["status"], "pushed", "{p1}");
    let stored = json(&a, &["stats"]);
    let first_upload = p1["uploaded_bytes"].as_u64().unwrap();
    assert!(first_upload > 0, "{p1}");

    // B clones: metadata only; reads fetch what they need.
    let b = clone(url, Some(&ep), false);
    assert_eq!(
        version_ids(&a, "lab/occupancy"),
        version_ids(&b, "lab/occupancy")
    );
    let f = fsck_json(&b, false);
    assert!(f["remote_chunks"].as_u64().unwrap() > 0, "{f}");
    for (name, bytes) in files_under(&data) {
        let out = run(&b, &["dataset", "cat", "lab/occupancy", &name]);
        assert!(out.status.success(), "cat {name}: {}", stderr(&out));
        assert_eq!(out.stdout, bytes, "{name} differs after the clone");
    }
    // A read-only copy of the whole version, materialized from the remote.
    let got = ok(&b, &["dataset", "get", "lab/occupancy"]);
    assert_eq!(files_under(Path::new(got.trim())), files_under(&data));

    // B adds a version (an edit) and pushes: only the new bytes go up.
    let bdata = b.path("data");
    copy_files(&occupancy_dir(), &bdata);
    let mut t = std::fs::read(bdata.join("datatest.txt")).unwrap();
    t.extend_from_slice(b"\"9999\",\"2015-02-10 00:00:00\",21,27,0,500,0.004,1\n");
    std::fs::write(bdata.join("datatest.txt"), &t).unwrap();
    ok(
        &b,
        &[
            "dataset",
            "sync",
            "lab/occupancy",
            bdata.to_str().unwrap(),
            "-m",
            "v2",
        ],
    );
    let p2 = json(&b, &["push"]);
    assert_eq!(
        p2["datasets"][0]["versions_sent"].as_array().unwrap().len(),
        1,
        "{p2}"
    );
    let small = p2["uploaded_bytes"].as_u64().unwrap();
    assert!(
        small < first_upload / 4,
        "an appended line uploaded {small} bytes (first push {first_upload}; stats {stored})"
    );

    // A pulls and gets B's version with its data.
    let pulled = json(&a, &["pull"]);
    assert_eq!(
        pulled["datasets"][0]["imported"].as_array().unwrap().len(),
        1,
        "{pulled}"
    );
    assert_eq!(
        version_ids(&a, "lab/occupancy"),
        version_ids(&b, "lab/occupancy")
    );
    let out = run(&a, &["dataset", "cat", "lab/occupancy", "datatest.txt"]);
    assert_eq!(out.stdout, t);

    // B downloads everything; both pass a full check.
    let v = json(
        &b,
        &[
            "dataset",
            "prefetch",
            "lab/occupancy@1.0.0",
            "lab/occupancy",
        ],
    );
    assert!(v["chunks"].as_u64().unwrap() > 0, "{v}");
    let fb = fsck_json(&b, true);
    assert_eq!(fb["remote_chunks"], 0, "{fb}");
    fsck_json(&a, true);
}

#[test]
fn concurrent_pushes_to_one_dataset_lose_nothing_and_a_clone_from_the_bucket_lists_every_version() {
    let s3 = S3Server::start();
    s3.bucket("race");
    let ep = s3.endpoint();
    let url = "s3://race/r";
    let a = Sandbox::new();
    let seed = a.path("seed");
    std::fs::create_dir_all(&seed).unwrap();
    std::fs::write(seed.join("base.csv"), b"a,b\n1,2\n").unwrap();
    ok(&a, &["dataset", "sync", "p/d", seed.to_str().unwrap()]);
    ok(&a, &["remote", "add", "origin", url, "--endpoint", &ep]);
    ok(&a, &["push"]);
    let b = clone(url, Some(&ep), false);

    const ROUNDS: usize = 20;
    let push_until_accepted = |s: &Sandbox, who: &str, round: usize| {
        let folder = s.path(&format!("{who}{round}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join(format!("{who}.csv")),
            format!("{who},{round}\n"),
        )
        .unwrap();
        ok(
            s,
            &[
                "dataset",
                "sync",
                "p/d",
                folder.to_str().unwrap(),
                "--dataset-path",
                &format!("{who}/{round}"),
            ],
        );
        for attempt in 0..10 {
            let out = run(s, &["push"]);
            if out.status.success() {
                return attempt;
            }
            let err = stderr(&out);
            assert!(
                err.contains("rejected") && err.contains("pull"),
                "{who} push: {err}"
            );
            ok(s, &["fetch"]);
        }
        panic!("{who} could not push round {round} in 10 attempts");
    };
    let mut rejections = 0;
    for round in 0..ROUNDS {
        let (ra, rb) = std::thread::scope(|sc| {
            let ha = sc.spawn(|| push_until_accepted(&a, "a", round));
            let hb = sc.spawn(|| push_until_accepted(&b, "b", round));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        rejections += ra + rb;
    }
    ok(&a, &["fetch"]);
    ok(&b, &["fetch"]);
    let ids_a = version_ids(&a, "p/d");
    assert_eq!(ids_a.len(), 1 + 2 * ROUNDS, "versions on A");
    assert_eq!(ids_a, version_ids(&b, "p/d"));
    // Version strings stayed unique through the rebases.
    let strings: BTreeSet<String> = json(&a, &["dataset", "list", "p/d"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(strings.len(), 1 + 2 * ROUNDS);
    // A repository rebuilt from the bucket alone lists every version.
    let c = clone(url, Some(&ep), false);
    assert_eq!(version_ids(&c, "p/d"), ids_a);
    // And every round's file is readable from it.
    for round in [0, ROUNDS / 2, ROUNDS - 1] {
        for who in ["a", "b"] {
            let p = format!("{who}/{round}/{who}.csv");
            let versions = json(&c, &["dataset", "list", "p/d"]);
            let holder = versions
                .as_array()
                .unwrap()
                .iter()
                .find(|v| {
                    run(&c, &["dataset", "cat", v["id"].as_str().unwrap(), &p])
                        .status
                        .success()
                })
                .unwrap_or_else(|| panic!("no version holds {p}"));
            let out = run(&c, &["dataset", "cat", holder["id"].as_str().unwrap(), &p]);
            assert_eq!(stdout(&out), format!("{who},{round}\n"));
        }
    }
    fsck_json(&c, false);
    eprintln!("{ROUNDS} rounds, {rejections} pushes rejected and retried after a fetch");
}

#[test]
fn a_killed_push_leaves_no_half_version_and_the_next_push_resumes() {
    let a = Sandbox::new();
    let remote = a.path("remote");
    let data = a.path("big");
    std::fs::create_dir_all(&data).unwrap();
    // About 100 MB of incompressible data: several packs.
    for i in 0..5u64 {
        std::fs::write(data.join(format!("f{i}.bin")), noise(i + 1, 20 << 20)).unwrap();
    }
    ok(&a, &["dataset", "sync", "p/big", data.to_str().unwrap()]);
    ok(&a, &["remote", "add", "origin", remote.to_str().unwrap()]);
    // Killed after its second upload.
    let out = run(&a, &["push", "--abort-after-uploads", "2"]);
    assert!(!out.status.success(), "the push was not aborted");
    let packs_after_kill = std::fs::read_dir(remote.join("packs")).unwrap().count();
    assert!(packs_after_kill >= 2, "{packs_after_kill} packs");
    // Nobody sees a version: no dataset document was written.
    let c = clone(remote.to_str().unwrap(), None, false);
    assert!(json(&c, &["dataset", "list"])
        .as_array()
        .unwrap()
        .is_empty());
    // The next push completes and does not upload what is there.
    let p = json(&a, &["push"]);
    assert_eq!(p["datasets"][0]["status"], "pushed", "{p}");
    let total: u64 = files_under(&data).iter().map(|(_, b)| b.len() as u64).sum();
    let sent = p["uploaded_bytes"].as_u64().unwrap();
    assert!(
        sent < total - (20 << 20),
        "resumed push sent {sent} of {total} bytes"
    );
    let c = clone(remote.to_str().unwrap(), None, true);
    for (name, bytes) in files_under(&data) {
        let out = run(&c, &["dataset", "cat", "p/big", &name]);
        assert_eq!(out.stdout, bytes, "{name}");
    }
    fsck_json(&c, true);
}

/// A repository with dataset `p/x` (one file `x.bin` of `len` noise bytes)
/// pushed to the folder remote `origin`: the sandbox, the remote, the bytes.
fn pushed_noise(seed: u64, len: usize) -> (Sandbox, PathBuf, Vec<u8>) {
    let a = Sandbox::new();
    let remote = a.path("remote");
    let data = a.path("data");
    std::fs::create_dir_all(&data).unwrap();
    let content = noise(seed, len);
    std::fs::write(data.join("x.bin"), &content).unwrap();
    ok(&a, &["dataset", "sync", "p/x", data.to_str().unwrap()]);
    ok(&a, &["remote", "add", "origin", remote.to_str().unwrap()]);
    ok(&a, &["push"]);
    (a, remote, content)
}

/// The largest pack under `root/packs` (a folder remote, or a `.dsv`).
fn largest_pack(remote: &Path) -> PathBuf {
    std::fs::read_dir(remote.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

#[test]
fn damaged_or_missing_objects_on_the_remote_are_named_and_never_served() {
    let (_a, remote, content) = pushed_noise(7, 3 << 20);
    let b = clone(remote.to_str().unwrap(), None, false);

    // Flip one byte inside the chunk data of the largest pack.
    let pack = largest_pack(&remote);
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let out = run(&b, &["dataset", "cat", "p/x", "x.bin"]);
    assert!(!out.status.success(), "a damaged chunk was served");
    let name = pack.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert!(
        content.starts_with(&out.stdout),
        "wrong bytes were written out"
    );

    // A missing pack is named too.
    std::fs::remove_file(&pack).unwrap();
    let out = run(&b, &["dataset", "cat", "p/x", "x.bin"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&name), "{}", stderr(&out));

    // A truncated pack fails a fetch, naming it; nothing is imported.
    bytes[1000] ^= 0x40;
    let short = &bytes[..bytes.len() - 10];
    let other = remote
        .join("packs")
        .join(format!("{}.pack", "ab".repeat(32)));
    std::fs::write(&other, short).unwrap();
    let before = version_ids(&b, "p/x");
    let out = run(&b, &["fetch"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&"ab".repeat(32)), "{}", stderr(&out));
    assert_eq!(version_ids(&b, "p/x"), before);
}

#[test]
fn dropped_connections_are_retried() {
    let s3 = S3Server::start();
    s3.bucket("flaky");
    // Every third connection breaks after 2 KiB of the server's answer.
    let proxy = FaultProxy::start(s3.port, 3, 2048);
    let ep = proxy.endpoint();
    let a = Sandbox::new();
    let data = a.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4u64 {
        std::fs::write(data.join(format!("f{i}.bin")), noise(i + 100, 1 << 20)).unwrap();
    }
    ok(&a, &["dataset", "sync", "p/f", data.to_str().unwrap()]);
    ok(
        &a,
        &["remote", "add", "origin", "s3://flaky/x", "--endpoint", &ep],
    );
    ok(&a, &["push"]);
    let b = clone("s3://flaky/x", Some(&ep), false);
    for (name, bytes) in files_under(&data) {
        let out = run(&b, &["dataset", "cat", "p/f", &name]);
        assert!(out.status.success(), "cat {name}: {}", stderr(&out));
        assert_eq!(out.stdout, bytes, "{name}");
    }
    let drops = proxy.dropped.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        drops > 0,
        "the proxy dropped nothing: the test tested nothing"
    );
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let s3 = S3Server::start();
    s3.bucket("exists");
    let ep = s3.endpoint();
    let a = Sandbox::new();
    let data = a.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"a\n").unwrap();
    ok(&a, &["dataset", "sync", "p/a", data.to_str().unwrap()]);
    let remotes = || json(&a, &["remote", "list"]);

    let out = run(&a, &["push", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no remote named 'nope'"),
        "{}",
        stderr(&out)
    );

    for url in ["ftp://host/x", "s3:///nobucket", "not a url:"] {
        let out = run(&a, &["remote", "add", "x", url]);
        assert_eq!(out.status.code(), Some(1), "{url}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("invalid remote URL"),
            "{url}: {}",
            stderr(&out)
        );
    }
    let out = run(
        &a,
        &["remote", "add", "x", "s3://missing/p", "--endpoint", &ep],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bucket does not exist"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("s3://missing/p"), "{}", stderr(&out));
    let out = run(
        &a,
        &[
            "remote",
            "add",
            "x",
            "s3://exists/p",
            "--endpoint",
            "http://127.0.0.1:1",
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("s3://exists/p"), "{}", stderr(&out));
    assert_eq!(remotes(), serde_json::json!([]));

    // A remote written by a newer dsv: refused on add and on fetch.
    let newer = a.path("newer");
    std::fs::create_dir_all(&newer).unwrap();
    std::fs::write(
        newer.join("dsv-remote.json"),
        br#"{"format": 99, "features": ["x"]}"#,
    )
    .unwrap();
    let out = run(&a, &["remote", "add", "n", newer.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("newer dsv"), "{}", stderr(&out));
    ok(
        &a,
        &["remote", "add", "n", newer.to_str().unwrap(), "--no-check"],
    );
    let before = json(&a, &["dataset", "list"]);
    for cmd in ["fetch", "push"] {
        let out = run(&a, &[cmd, "n"]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("newer dsv"),
            "{cmd}: {}",
            stderr(&out)
        );
    }
    assert_eq!(json(&a, &["dataset", "list"]), before);
    assert!(!newer.join("packs").exists(), "a refused push wrote packs");

    // Clone of a URL with nothing there creates nothing.
    let target = a.path("clone-target");
    let out = run(
        &a,
        &[
            "clone",
            "s3://exists/empty",
            target.to_str().unwrap(),
            "--endpoint",
            &ep,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!target.exists());
}

#[test]
fn a_lazy_clone_reads_for_root_and_for_an_unprivileged_user_and_sync_push_uploads_in_one_step() {
    let a = Sandbox::new();
    let remote = a.path("remote");
    let data = a.path("data");
    copy_files(&occupancy_dir(), &data);
    ok(&a, &["remote", "add", "origin", remote.to_str().unwrap()]);
    // The "upload" button: one command stores the version and pushes it.
    let v = json(
        &a,
        &[
            "dataset",
            "sync",
            "lab/occ",
            data.to_str().unwrap(),
            "--push",
        ],
    );
    assert_eq!(v["changed"], true, "{v}");
    let b = clone(remote.to_str().unwrap(), None, false);
    let want = std::fs::read(data.join("datatraining.txt")).unwrap();
    // As root (the cache is written) …
    let out = run(&b, &["dataset", "cat", "lab/occ", "datatraining.txt"]);
    assert_eq!(out.stdout, want);
    // Every cached chunk damaged: the next read drops and refetches them.
    let cache = b.repo().join(".dsv/remote-cache");
    let damaged = files_under(&cache);
    assert!(!damaged.is_empty());
    for (rel, mut bytes) in damaged {
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(cache.join(&rel), bytes).unwrap();
    }
    let out = run(&b, &["dataset", "cat", "lab/occ", "datatraining.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, want, "a damaged cache entry was served");
    // … and as an unprivileged user on a repository it may read but whose
    // cache it may not write: still served, checked, nothing written.
    let c = clone(remote.to_str().unwrap(), None, false);
    if dsv_tests::is_root() {
        // The repository is open to everyone; its cache folder is not.
        dsv_tests::open_to_everyone(c.dir.path());
        dsv_tests::open_to_everyone(&remote);
        let cache = c.repo().join(".dsv/remote-cache");
        std::fs::create_dir_all(&cache).unwrap();
        let ok = std::process::Command::new("chmod")
            .args(["0755"])
            .arg(&cache)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let before = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
        let out = dsv_tests::dsv_unprivileged(
            &c.repo(),
            &["dataset", "cat", "lab/occ", "datatraining.txt"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout, want);
        let after = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
        assert_eq!(before, after, "an unprivileged read wrote the cache");
    }
}

#[test]
fn a_wiped_remote_gets_everything_again_and_a_chunk_damaged_here_is_never_pushed() {
    let (a, remote, content) = pushed_noise(11, 2 << 20);
    // The bucket is emptied: this repository's record of it is stale, and
    // the next push notices and sends everything again.
    std::fs::remove_dir_all(&remote).unwrap();
    let p = json(&a, &["push"]);
    assert!(
        p["uploaded_bytes"].as_u64().unwrap() > content.len() as u64 / 2,
        "{p}"
    );
    let c = clone(remote.to_str().unwrap(), None, true);
    assert_eq!(run(&c, &["dataset", "cat", "p/x", "x.bin"]).stdout, content);

    // A stored chunk rots here: a push refuses to send it, naming it.
    std::fs::remove_dir_all(&remote).unwrap();
    let pack = largest_pack(&a.repo().join(".dsv"));
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[5000] ^= 0x10;
    std::fs::write(&pack, &bytes).unwrap();
    let out = run(&a, &["push"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("chunk"), "{}", stderr(&out));
    let docs = remote.join("datasets");
    assert!(
        !docs.exists() || std::fs::read_dir(&docs).unwrap().next().is_none(),
        "a dataset document was published over damaged content"
    );
}

/// Creates and runs the occupancy logistic task in `s`; returns its id.
fn train_occupancy(s: &Sandbox) -> String {
    let t = json(
        s,
        &[
            "task",
            "create",
            "occ/model",
            "--trainer",
            "logistic",
            "--set",
            "General/dataset_id=occ/train",
            "--set",
            "General/test_dataset_id=occ/test",
            "--set",
            "General/label=Occupancy",
            "--set",
            "General/features=Temperature,Light,CO2",
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(s, &["task", "run", &t]);
    t
}

#[test]
fn a_training_task_runs_in_a_lazy_clone_and_its_model_travels_with_push_and_pull() {
    let a = Sandbox::new();
    let remote = a.path("remote");
    for (ds, file) in [
        ("occ/train", "datatraining.txt"),
        ("occ/test", "datatest.txt"),
    ] {
        let d = a.path(ds);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(occupancy_dir().join(file), d.join(file)).unwrap();
        ok(&a, &["dataset", "sync", ds, d.to_str().unwrap()]);
    }
    // A third dataset the task does not read.
    let other = a.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("big.bin"), noise(3, 4 << 20)).unwrap();
    ok(
        &a,
        &["dataset", "sync", "occ/unused", other.to_str().unwrap()],
    );
    ok(&a, &["remote", "add", "origin", remote.to_str().unwrap()]);
    ok(&a, &["push"]);

    let b = clone(remote.to_str().unwrap(), None, false);
    let t = train_occupancy(&b);
    let shown = json(&b, &["task", "show", &t]);
    assert_eq!(shown["status"], "completed", "{shown}");
    let acc = shown["metrics"]["test/accuracy"]
        .as_f64()
        .or_else(|| shown["last_metrics"]["test/accuracy"].as_f64());
    assert!(acc.is_some_and(|a| a > 0.9), "{shown}");
    // What it read came from the remote into the cache; the dataset it
    // did not read did not.
    let cache = b.repo().join(".dsv/remote-cache");
    let cached: u64 = files_under(&cache)
        .iter()
        .map(|(_, d)| d.len() as u64)
        .sum();
    let train = std::fs::metadata(occupancy_dir().join("datatraining.txt"))
        .unwrap()
        .len();
    assert!(cached > 0, "nothing was read from the remote");
    assert!(
        cached < train + (4 << 20) / 2,
        "{cached} bytes cached: the unused dataset was fetched"
    );
    // The model goes with a push (record and body) and comes with a pull;
    // a production model here keeps its tag against the remote's.
    let model_b = json(&b, &["model", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&b, &["model", "tag", &model_b, "--add", "production"]);
    let pushed = json(&b, &["push"]);
    assert_eq!(pushed["models"], 1, "{pushed}");
    train_occupancy(&a);
    let model_a = json(&a, &["model", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(model_a, model_b);
    ok(&a, &["model", "tag", &model_a, "--add", "production"]);
    let pulled = json(&a, &["pull"]);
    let models = pulled["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{pulled}");
    assert_eq!(models[0]["id"], model_b.as_str(), "{pulled}");
    assert_eq!(
        models[0]["dropped_tags"],
        serde_json::json!(["production"]),
        "{pulled}"
    );
    let shown_a = json(&a, &["model", "show", &model_b]);
    let shown_b = json(&b, &["model", "show", &model_b]);
    assert!(
        shown_a["metrics"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "{shown_a}"
    );
    assert_eq!(shown_a["metrics"], shown_b["metrics"]);
    assert_eq!(shown_a["datasets"], shown_b["datasets"]);
    assert_eq!(
        json(&a, &["model", "show", "occ/model@production"])["id"],
        model_a.as_str()
    );
    let csv = occupancy_dir().join("datatest2.txt");
    let csv = csv.to_str().unwrap();
    assert_eq!(
        ok(&a, &["model", "predict", &model_b, csv]),
        ok(&b, &["model", "predict", &model_b, csv]),
        "the imported model predicts differently"
    );
    // A second pull imports nothing; a damaged model document on the
    // remote is named and skipped, never stops the pull; a second push
    // sends no model.
    std::fs::write(
        remote.join("models/0123456789abcdef0123456789abcdef.json"),
        b"{not json",
    )
    .unwrap();
    let again = json(&a, &["pull"]);
    assert!(again["models"].as_array().unwrap().is_empty(), "{again}");
    let problems = again["model_problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{again}");
    assert!(
        problems[0][0]
            .as_str()
            .unwrap()
            .contains("0123456789abcdef"),
        "{again}"
    );
    assert_eq!(json(&b, &["push"])["models"], 0);
}

#[test]
fn a_mount_of_a_lazy_clone_serves_byte_identical_files() {
    let a = Sandbox::new();
    let remote = a.path("remote");
    let data = a.path("data");
    copy_files(&occupancy_dir(), &data);
    std::fs::write(data.join("big.bin"), noise(21, 12 << 20)).unwrap();
    ok(&a, &["dataset", "sync", "lab/occ", data.to_str().unwrap()]);
    ok(&a, &["remote", "add", "origin", remote.to_str().unwrap()]);
    ok(&a, &["push"]);
    let b = clone(remote.to_str().unwrap(), None, false);
    let at = b.path("mnt");
    let child = dsv_tests::start_mount(&b, "lab/occ", &at);
    let served = files_under(&at);
    dsv_tests::stop_mount(child, &at);
    assert_eq!(served, files_under(&data));
}

fn put_lease(s3: &S3Server, key: &str, kind: &str, ttl_ms: u64) {
    let body = format!(
        r#"{{"kind":"{kind}","holder":"feed","host":"other-machine","pid":1,"ttl_ms":{ttl_ms}}}"#
    );
    let r = s3.request("PUT", &format!("/gcb/r/leases/{key}"), body.as_bytes());
    assert!(matches!(r, Some((200, _))), "{r:?}");
}

#[test]
fn a_remote_gc_deletes_only_what_interrupted_pushes_left_and_never_runs_beside_a_push() {
    let s3 = S3Server::start();
    s3.bucket("gcb");
    let ep = s3.endpoint();
    let url = "s3://gcb/r";
    // A pushes a dataset.
    let a = Sandbox::new();
    let data_a = a.path("a");
    std::fs::create_dir_all(&data_a).unwrap();
    for i in 0..3u64 {
        std::fs::write(data_a.join(format!("a{i}.bin")), noise(100 + i, 4 << 20)).unwrap();
    }
    ok(&a, &["dataset", "sync", "p/a", data_a.to_str().unwrap()]);
    ok(&a, &["remote", "add", "origin", url, "--endpoint", &ep]);
    ok(&a, &["push"]);
    let packs_a = s3.keys("gcb", "r/packs/");
    // B's push of other data is killed after its first upload: an
    // unreferenced pack on the remote.
    let b = Sandbox::new();
    let data_b = b.path("b");
    std::fs::create_dir_all(&data_b).unwrap();
    for i in 0..3u64 {
        std::fs::write(data_b.join(format!("b{i}.bin")), noise(200 + i, 4 << 20)).unwrap();
    }
    ok(&b, &["dataset", "sync", "p/b", data_b.to_str().unwrap()]);
    ok(&b, &["remote", "add", "origin", url, "--endpoint", &ep]);
    let out = run(&b, &["push", "--abort-after-uploads", "1"]);
    assert!(!out.status.success(), "the push was not aborted");
    let all = s3.keys("gcb", "r/packs/");
    let orphans: Vec<&String> = all.iter().filter(|k| !packs_a.contains(k)).collect();
    assert!(!orphans.is_empty(), "the killed push uploaded nothing");

    // A dry run names them and deletes nothing; the default grace keeps them.
    let dry = json(&a, &["remote", "gc", "--grace", "0", "--dry-run"]);
    assert_eq!(dry["deleted_packs"], orphans.len(), "{dry}");
    assert_eq!(s3.keys("gcb", "r/packs/"), all);
    let kept = json(&a, &["remote", "gc"]);
    assert_eq!(kept["deleted_packs"], 0, "{kept}");
    assert_eq!(kept["young_packs"], orphans.len(), "{kept}");
    assert_eq!(s3.keys("gcb", "r/packs/"), all);

    // A live push lease of another machine stops a gc; a live gc lease
    // stops a push, which then publishes nothing.
    put_lease(&s3, "push-feed.json", "push", 600_000);
    let out = run(&a, &["remote", "gc", "--grace", "0"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a push by other-machine (pid 1) is running"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s3.keys("gcb", "r/packs/"), all);
    // A dry run deletes nothing, so it runs beside a push.
    let dry = json(&a, &["remote", "gc", "--grace", "0", "--dry-run"]);
    assert_eq!(dry["deleted_packs"], orphans.len(), "{dry}");
    assert!(s3
        .request("DELETE", "/gcb/r/leases/push-feed.json", b"")
        .is_some());
    put_lease(&s3, "gc-feed.json", "gc", 600_000);
    std::fs::write(data_a.join("a9.bin"), noise(109, 1 << 20)).unwrap();
    ok(&a, &["dataset", "sync", "p/a", data_a.to_str().unwrap()]);
    let out = run(&a, &["push"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a gc by other-machine (pid 1) is running"),
        "{}",
        stderr(&out)
    );
    let c = clone(url, Some(&ep), false);
    assert_eq!(version_ids(&c, "p/a").len(), 1, "a refused push published");
    // An expired lease holds nothing up.
    put_lease(&s3, "gc-feed.json", "gc", 0);
    ok(&a, &["push"]);

    // Now the gc deletes exactly the killed push's packs (and the expired
    // lease), and everything pushed stays readable.
    let done = json(&a, &["remote", "gc", "--grace", "0"]);
    assert_eq!(done["deleted_packs"], orphans.len(), "{done}");
    assert!(done["expired_leases"].as_u64().unwrap() >= 1, "{done}");
    let left = s3.keys("gcb", "r/packs/");
    for o in &orphans {
        assert!(!left.contains(o), "{o} survived");
    }
    assert!(s3.keys("gcb", "r/leases/").is_empty());
    let again = json(&a, &["remote", "gc", "--grace", "0"]);
    assert_eq!(again["deleted_packs"], 0, "{again}");
    // B, whose view of the remote still lists the deleted pack, pushes
    // again and sends what is gone.
    ok(&b, &["push"]);
    let c = clone(url, Some(&ep), true);
    assert_eq!(version_ids(&c, "p/a").len(), 2);
    for (ds, dir) in [("p/a", &data_a), ("p/b", &data_b)] {
        for (name, bytes) in files_under(dir) {
            let out = run(&c, &["dataset", "cat", ds, &name]);
            assert_eq!(out.stdout, bytes, "{ds} {name}");
        }
    }
    fsck_json(&c, true);
}

#[test]
fn wrong_credentials_are_named_and_change_nothing() {
    let s3 = S3Server::start();
    s3.bucket("creds");
    let ep = s3.endpoint();
    let a = Sandbox::new();
    let data = a.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"a\n").unwrap();
    ok(&a, &["dataset", "sync", "p/a", data.to_str().unwrap()]);
    ok(
        &a,
        &["remote", "add", "origin", "s3://creds/p", "--endpoint", &ep],
    );
    ok(&a, &["push"]);
    let before = json(&a, &["dataset", "list", "p/a"]);
    // The server now refuses the key dsv signs with.
    s3.enforce_auth();
    let out = run(
        &a,
        &["remote", "add", "again", "s3://creds/p", "--endpoint", &ep],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("s3://creds/p") && err.contains("credentials were refused"),
        "{err}"
    );
    assert!(!err.contains("testing"), "a secret was printed: {err}");
    let names: Vec<String> = json(&a, &["remote", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["origin"]);
    std::fs::write(data.join("b.txt"), b"b\n").unwrap();
    ok(&a, &["dataset", "sync", "p/a", data.to_str().unwrap()]);
    let after_sync = json(&a, &["dataset", "list", "p/a"]);
    for cmd in ["push", "fetch", "pull"] {
        let out = run(&a, &[cmd]);
        assert!(!out.status.success(), "{cmd} succeeded");
        assert!(
            stderr(&out).contains("credentials were refused"),
            "{cmd}: {}",
            stderr(&out)
        );
    }
    assert_eq!(json(&a, &["dataset", "list", "p/a"]), after_sync);
    assert_ne!(after_sync, before);
    let target = a.path("c");
    let out = run(
        &a,
        &[
            "clone",
            "s3://creds/p",
            target.to_str().unwrap(),
            "--endpoint",
            &ep,
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("credentials were refused"),
        "{}",
        stderr(&out)
    );
    assert!(!target.exists(), "a refused clone left a folder");
}

fn local_pack_bytes(s: &Sandbox) -> u64 {
    files_under(&s.repo().join(".dsv/packs"))
        .iter()
        .map(|(_, b)| b.len() as u64)
        .sum()
}

#[test]
fn a_repository_whose_packs_live_on_object_storage_keeps_only_metadata_here() {
    let s3 = S3Server::start();
    s3.bucket("objs");
    let ep = s3.endpoint();
    let a = Sandbox::empty();
    let repo = a.repo();
    let init = json(
        &a,
        &[
            "init",
            repo.to_str().unwrap(),
            "--objects",
            "s3://objs/team",
            "--endpoint",
            &ep,
        ],
    );
    assert_eq!(init["objects"], "s3://objs/team", "{init}");
    for (ds, file) in [
        ("occ/train", "datatraining.txt"),
        ("occ/test", "datatest.txt"),
    ] {
        let d = a.path(ds);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(occupancy_dir().join(file), d.join(file)).unwrap();
        ok(&a, &["dataset", "sync", ds, d.to_str().unwrap()]);
    }
    // The data went to the bucket; the local packs were evicted.
    assert_eq!(local_pack_bytes(&a), 0);
    assert!(!s3.keys("objs", "team/packs/").is_empty());
    let stats = json(&a, &["stats"]);
    assert_eq!(stats["chunks"], 0, "{stats}");
    // Reads come back through the cache, byte-identical.
    let out = run(&a, &["dataset", "cat", "occ/train", "datatraining.txt"]);
    assert_eq!(
        out.stdout,
        std::fs::read(occupancy_dir().join("datatraining.txt")).unwrap()
    );
    // A task trains from it; its model goes to the bucket too.
    train_occupancy(&a);
    assert_eq!(s3.keys("objs", "team/models/").len(), 2);
    assert_eq!(local_pack_bytes(&a), 0);
    fsck_json(&a, true);
    // The objects remote cannot be removed.
    let out = run(&a, &["remote", "remove", "objects"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("holds this repository's packs"),
        "{}",
        stderr(&out)
    );
    // A second machine: init on the same bucket lists what is there.
    let b = Sandbox::empty();
    let init_b = json(
        &b,
        &[
            "init",
            b.repo().to_str().unwrap(),
            "--objects",
            "s3://objs/team",
            "--endpoint",
            &ep,
        ],
    );
    assert_eq!(init_b["fetched"], 2, "{init_b}");
    assert_eq!(version_ids(&b, "occ/train"), version_ids(&a, "occ/train"));
    assert_eq!(json(&b, &["model", "list"]).as_array().unwrap().len(), 1);
    let out = run(&b, &["dataset", "cat", "occ/test", "datatest.txt"]);
    assert_eq!(
        out.stdout,
        std::fs::read(occupancy_dir().join("datatest.txt")).unwrap()
    );
    // A missing bucket creates nothing.
    let c = Sandbox::empty();
    let out = run(
        &c,
        &[
            "init",
            c.repo().to_str().unwrap(),
            "--objects",
            "s3://nobucket/x",
            "--endpoint",
            &ep,
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bucket does not exist"),
        "{}",
        stderr(&out)
    );
    assert!(!c.repo().exists(), "a refused init left a folder");
}

#[test]
fn an_object_store_that_cannot_be_reached_loses_nothing_and_the_next_command_sends_it() {
    let a = Sandbox::empty();
    let bucket = a.path("bucket");
    let repo = a.repo();
    ok(
        &a,
        &[
            "init",
            repo.to_str().unwrap(),
            "--objects",
            bucket.to_str().unwrap(),
        ],
    );
    let data = a.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.bin"), noise(7, 3 << 20)).unwrap();
    ok(&a, &["dataset", "sync", "p/d", data.to_str().unwrap()]);
    assert_eq!(local_pack_bytes(&a), 0);
    // A draft's data is not on the store: a flush (here, a sync of another
    // dataset) keeps it here, and it finalizes whole.
    let more = a.path("more");
    std::fs::create_dir_all(&more).unwrap();
    std::fs::write(more.join("draft.bin"), noise(9, 2 << 20)).unwrap();
    let draft = json(&a, &["dataset", "create", "p/drafted"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&a, &["dataset", "add", &draft, more.to_str().unwrap()]);
    let other = a.path("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("o.bin"), noise(10, 1 << 20)).unwrap();
    ok(&a, &["dataset", "sync", "p/other", other.to_str().unwrap()]);
    assert!(
        local_pack_bytes(&a) >= 2 << 20,
        "the draft's pack was evicted"
    );
    ok(&a, &["dataset", "finalize", &draft]);
    assert_eq!(local_pack_bytes(&a), 0, "finalize did not flush");
    let out = run(&a, &["dataset", "cat", "p/drafted", "draft.bin"]);
    assert_eq!(out.stdout, noise(9, 2 << 20));
    // The store breaks (a file where its folder was): the sync keeps the
    // version and its data here and says so.
    let away = a.path("bucket-away");
    std::fs::rename(&bucket, &away).unwrap();
    std::fs::write(&bucket, b"not a folder").unwrap();
    std::fs::write(data.join("b.bin"), noise(8, 3 << 20)).unwrap();
    let out = run(&a, &["dataset", "sync", "p/d", data.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stored here, but not sent to the object store")
            && stderr(&out).contains("nothing is lost"),
        "{}",
        stderr(&out)
    );
    assert_eq!(version_ids(&a, "p/d").len(), 2);
    assert!(local_pack_bytes(&a) >= 3 << 20);
    let out = run(&a, &["dataset", "cat", "p/d", "b.bin"]);
    assert_eq!(out.stdout, noise(8, 3 << 20));
    // Back: the next push sends it and evicts the local packs.
    std::fs::remove_file(&bucket).unwrap();
    std::fs::rename(&away, &bucket).unwrap();
    ok(&a, &["dataset", "sync", "p/d", data.to_str().unwrap()]);
    assert_eq!(local_pack_bytes(&a), 0);
    let c = clone(bucket.to_str().unwrap(), None, true);
    for (name, bytes) in files_under(&data) {
        let out = run(&c, &["dataset", "cat", "p/d", &name]);
        assert_eq!(out.stdout, bytes, "{name}");
    }
    fsck_json(&c, true);
    // fsck --read-data --remote downloads and rehashes what lives in the
    // bucket (not the cached copies)…
    let checked = json(&a, &["fsck", "--read-data", "--remote"]);
    assert!(
        checked["remote"]["chunks"].as_u64().unwrap() > 0,
        "{checked}"
    );
    assert!(
        checked["remote"]["bytes"].as_u64().unwrap() >= 6 << 20,
        "{checked}"
    );
    // …and names a damaged pack there, which plain --read-data does not read.
    flip_middle_byte(&largest_pack(&bucket));
    fsck_json(&a, true);
    let out = run(&a, &["--json", "fsck", "--read-data", "--remote"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], false, "{doc}");
    assert!(
        !doc["remote"]["problems"].as_array().unwrap().is_empty(),
        "{doc}"
    );
}
