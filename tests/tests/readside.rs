//! End-to-end tests of the read side: read-only cached copies (`get`),
//! mutable copies (`copy`), `verify --folder`, the byte-bounded cache, gc of
//! deleted versions' copies, and a real read-only FUSE mount.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dsv_tests::{
    dsv_bin, is_root, occupancy_dir, open_to_everyone, run_unprivileged, start_mount, stderr,
    stop_mount, Sandbox,
};
use serde_json::Value;

const OCC: [&str; 3] = ["datatraining.txt", "datatest.txt", "datatest2.txt"];

/// A sandbox whose `data/` folder holds the occupancy files, synced as
/// `uci/occupancy`; returns the version id.
fn occupancy_repo() -> (Sandbox, String) {
    let s = Sandbox::new();
    std::fs::create_dir_all(s.path("data")).unwrap();
    for f in OCC {
        std::fs::copy(occupancy_dir().join(f), s.path("data").join(f)).unwrap();
    }
    let v = s.json(&["dataset", "sync", "uci/occupancy", "data"]);
    (s, v["id"].as_str().unwrap().to_string())
}

fn files_equal(a: &Path, b: &Path) {
    for f in OCC {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn get_returns_a_read_only_copy_that_verify_checks() {
    let (s, id) = occupancy_repo();
    if is_root() {
        // Permission bits do not bind root: run the reads as nobody.
        open_to_everyone(s.dir.path());
    }
    let dsv = dsv_bin();
    let dsv = dsv.to_str().unwrap();
    let repo = s.repo();
    let repo = repo.to_str().unwrap();
    let get = |args: &[&str]| -> Value {
        let mut all = vec!["--repo", repo, "--json", "dataset", "get"];
        all.extend_from_slice(args);
        let out = run_unprivileged(dsv, &all);
        assert!(out.status.success(), "get failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = get(&["uci/occupancy"]);
    assert_eq!(first["id"], id.as_str());
    assert_eq!(first["cached"], false);
    assert_eq!(first["materialized_files"], 3);
    let path = PathBuf::from(first["path"].as_str().unwrap());
    files_equal(&occupancy_dir(), &path);

    // A second get is a lookup.
    let again = get(&[&id[..10]]);
    assert_eq!(again["path"], first["path"]);
    assert_eq!(again["cached"], true);
    assert_eq!(again["materialized_files"], 0);

    // Read-only: neither editing a file nor adding one works.
    let target = path.join("datatest.txt");
    let t = target.to_str().unwrap();
    let out = run_unprivileged("sh", &["-c", &format!("echo x >> '{t}'")]);
    assert!(!out.status.success(), "appending to a cached file worked");
    let new = path.join("new.txt");
    let out = run_unprivileged("sh", &["-c", &format!("echo x > '{}'", new.display())]);
    assert!(
        !out.status.success(),
        "creating a file in a cached copy worked"
    );
    assert!(!new.exists());
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o222,
        0
    );

    // The copy and the original folder match the version.
    let ok = s.json(&[
        "dataset",
        "verify",
        "uci/occupancy",
        "--folder",
        path.to_str().unwrap(),
    ]);
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["files"], 3);
    let ok = s.json(&[
        "dataset",
        "verify",
        "uci/occupancy",
        "--folder",
        "data",
        "--full",
    ]);
    assert_eq!(ok["ok"], true);
    assert_eq!(ok["hashed"], 3);

    // Someone makes it writable again and edits a byte in place (same size).
    let out = run_unprivileged(
        "sh",
        &[
            "-c",
            &format!(
                "chmod u+w '{t}' && printf 9 | dd of='{t}' bs=1 seek=1000 conv=notrunc 2>/dev/null"
            ),
        ],
    );
    assert!(
        out.status.success(),
        "chmod + edit failed: {}",
        stderr(&out)
    );
    let out = s.dsv(&[
        "--json",
        "dataset",
        "verify",
        "uci/occupancy",
        "--folder",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], false);
    let m = r["mismatches"].as_array().unwrap();
    assert_eq!(m.len(), 1, "{r}");
    assert_eq!(m[0]["path"], "datatest.txt");
    assert_eq!(m[0]["kind"], "content");
    assert!(stderr(&out).contains("datatest.txt") || stderr(&out).contains("differs"));

    // A fresh get of another version sharing that file never links the
    // tampered bytes: the content file lost its seal.
    let after = s.json(&[
        "dataset",
        "get",
        "uci/occupancy",
        "--include",
        "datatest.txt",
    ]);
    let fresh = PathBuf::from(after["path"].as_str().unwrap()).join("datatest.txt");
    assert_eq!(
        std::fs::read(&fresh).unwrap(),
        std::fs::read(occupancy_dir().join("datatest.txt")).unwrap()
    );
}

#[test]
fn verify_folder_lists_every_kind_of_difference() {
    let (s, _) = occupancy_repo();
    let copy = s.path("copy");
    s.json(&["dataset", "copy", "uci/occupancy", copy.to_str().unwrap()]);
    std::fs::remove_file(copy.join("datatest.txt")).unwrap();
    std::fs::write(copy.join("extra.csv"), "a,b\n").unwrap();
    let f = copy.join("datatest2.txt");
    let mut body = std::fs::read(&f).unwrap();
    body.push(b'\n');
    std::fs::write(&f, body).unwrap();
    let out = s.dsv(&[
        "--json",
        "dataset",
        "verify",
        "uci/occupancy",
        "--folder",
        "copy",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: BTreeSet<(String, String)> = r["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap().to_string(),
                m["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("datatest.txt", "missing"),
        ("datatest2.txt", "size"),
        ("extra.csv", "extra"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn a_version_sharing_files_materializes_only_what_is_new() {
    let (s, v1) = occupancy_repo();
    let a = s.json(&["dataset", "get", &v1]);
    let extra = "Occupancy\n1\n0\n";
    std::fs::write(s.path("data/labels-extra.csv"), extra).unwrap();
    let v2 = s.json(&["dataset", "sync", "uci/occupancy", "data"]);
    let b = s.json(&["dataset", "get", v2["id"].as_str().unwrap()]);
    assert_eq!(b["cached"], false);
    assert_eq!(b["materialized_files"], 1, "{b}");
    assert_eq!(b["files"], 4);
    // Shared files are the same inode in both copies.
    let pa = PathBuf::from(a["path"].as_str().unwrap());
    let pb = PathBuf::from(b["path"].as_str().unwrap());
    for f in OCC {
        assert_eq!(
            std::fs::metadata(pa.join(f)).unwrap().ino(),
            std::fs::metadata(pb.join(f)).unwrap().ino(),
            "{f} is stored twice in the cache"
        );
    }
    let size = s.json(&["cache", "size"]);
    let orig: u64 = OCC
        .iter()
        .map(|f| std::fs::metadata(occupancy_dir().join(f)).unwrap().len())
        .sum();
    assert_eq!(size["bytes"].as_u64().unwrap(), orig + extra.len() as u64);
    assert_eq!(size["entries"], 2);
}

#[test]
fn concurrent_gets_of_one_version_agree() {
    let (s, _) = occupancy_repo();
    // Many files, so that processes race on the same content files.
    for i in 0..40 {
        std::fs::write(
            s.path(&format!("data/blob-{i}.bin")),
            dsv_tests::noise(100 + i, 50_000),
        )
        .unwrap();
    }
    let id = s.json(&["dataset", "sync", "uci/occupancy", "data"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    for _round in 0..4 {
        s.json(&["cache", "prune", "--max-bytes", "0"]);
        let children: Vec<_> = (0..8)
            .map(|_| {
                s.cmd(&["--json", "dataset", "get", &id])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut paths = BTreeSet::new();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            paths.insert(v["path"].as_str().unwrap().to_string());
        }
        assert_eq!(paths.len(), 1);
        let p = PathBuf::from(paths.into_iter().next().unwrap());
        files_equal(&occupancy_dir(), &p);
        for i in 0..40 {
            assert_eq!(
                std::fs::read(p.join(format!("blob-{i}.bin"))).unwrap(),
                dsv_tests::noise(100 + i, 50_000)
            );
        }
        // No half-built folders or stray temporary files are left behind.
        let list = s.json(&["cache", "list"]);
        assert_eq!(names(&list).len(), 1);
        let leftovers: Vec<_> = std::fs::read_dir(s.repo().join(".dsv/cache/versions"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn copy_is_mutable_and_guards_its_target() {
    let (s, _) = occupancy_repo();
    s.json(&["dataset", "get", "uci/occupancy"]);
    let t = s.path("work");
    let r = s.json(&["dataset", "copy", "uci/occupancy", "work"]);
    assert_eq!(r["files"], 3);
    files_equal(&occupancy_dir(), &t);
    for f in OCC {
        let m = std::fs::metadata(t.join(f)).unwrap();
        assert_eq!(m.nlink(), 1, "{f} is hard-linked into the cache");
        assert_ne!(m.permissions().mode() & 0o200, 0, "{f} is not writable");
    }
    std::fs::write(t.join("datatest.txt"), "edited").unwrap();
    // The cache is untouched by the edit.
    let cached = s.json(&["dataset", "get", "uci/occupancy"]);
    let cp = PathBuf::from(cached["path"].as_str().unwrap());
    files_equal(&occupancy_dir(), &cp);

    // A non-empty target is refused and left as it was.
    let out = s.dsv(&["dataset", "copy", "uci/occupancy", "work"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("work"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(t.join("datatest.txt")).unwrap(), b"edited");
    s.json(&["dataset", "copy", "uci/occupancy", "work", "--overwrite"]);
    files_equal(&occupancy_dir(), &t);

    // Partial copies and partial gets.
    let r = s.json(&[
        "dataset",
        "copy",
        "uci/occupancy",
        "part",
        "--include",
        "datatest*",
    ]);
    assert_eq!(r["files"], 2);
    assert!(!s.path("part/datatraining.txt").exists());
    let g = s.json(&[
        "dataset",
        "get",
        "uci/occupancy",
        "--include",
        "datatraining.txt",
    ]);
    assert_eq!(g["files"], 1);
    let gp = PathBuf::from(g["path"].as_str().unwrap());
    let listed: Vec<_> = std::fs::read_dir(&gp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listed, vec![std::ffi::OsString::from("datatraining.txt")]);
    let out = s.dsv(&["dataset", "get", "uci/occupancy", "--include", "nothing*"]);
    assert_eq!(out.status.code(), Some(1));
}

/// Four datasets of 3 MB each, distinct content.
fn four_versions(s: &Sandbox) -> Vec<String> {
    (0..4)
        .map(|i| {
            let dir = s.path(&format!("v{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("blob.bin"), dsv_tests::noise(i + 1, 3_000_000)).unwrap();
            let v = s.json(&["dataset", "sync", &format!("p/d{i}"), dir.to_str().unwrap()]);
            v["id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn the_cache_budget_evicts_least_recently_used_copies() {
    let s = Sandbox::new();
    let ids = four_versions(&s);
    s.json(&["cache", "budget", "10MB"]);
    for id in &ids[..3] {
        let g = s.json(&["dataset", "get", id]);
        assert_eq!(g["evicted"].as_array().unwrap().len(), 0);
    }
    // Use the first again; the second is now the least recently used.
    s.json(&["dataset", "get", &ids[0]]);
    let g = s.json(&["dataset", "get", &ids[3]]);
    assert_eq!(g["evicted"], serde_json::json!([ids[1]]), "{g}");
    let kept: BTreeSet<String> = names(&s.json(&["cache", "list"])).into_iter().collect();
    let want: BTreeSet<String> = [&ids[0], &ids[2], &ids[3]]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(kept, want);
    assert!(s.json(&["cache", "size"])["bytes"].as_u64().unwrap() <= 10_000_000);

    // An explicit prune to 4 MB keeps only the most recent copy.
    let r = s.json(&["cache", "prune", "--max-bytes", "4MB"]);
    assert!(r["bytes_after"].as_u64().unwrap() <= 4_000_000, "{r}");
    assert_eq!(names(&s.json(&["cache", "list"])), vec![ids[3].clone()]);

    // A budget below one file: a clear error and nothing changed.
    s.json(&["cache", "budget", "3.5MB"]);
    let before = s.json(&["cache", "list"]);
    s.json(&["cache", "budget", "1MB"]);
    let after_budget = s.json(&["cache", "list"]);
    assert!(
        names(&after_budget).is_empty(),
        "lowering the budget prunes"
    );
    s.json(&["cache", "budget", "1MB"]);
    let out = s.dsv(&["dataset", "get", &ids[0]]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("blob.bin") && e.contains("budget"), "{e}");
    assert!(names(&s.json(&["cache", "list"])).is_empty());
    assert_eq!(names(&before).len(), 1);
    let size = s.json(&["cache", "size"]);
    assert_eq!(size["bytes"], 0);
    assert_eq!(size["max_bytes"], 1_000_000);
}

#[test]
fn a_copy_in_use_is_not_evicted_and_gc_frees_deleted_versions() {
    let s = Sandbox::new();
    let ids = four_versions(&s);
    let g0 = s.json(&["dataset", "get", &ids[0]]);
    s.json(&["dataset", "get", &ids[1]]);
    // Hold a pin on the first copy as a running task would (shared flock).
    let pin = s.repo().join(format!(".dsv/cache/meta/{}.pin", ids[0]));
    // `cat` runs until its stdin closes; --close keeps the lock in flock itself.
    let holder = Command::new("flock")
        .args(["--shared", "--close", pin.to_str().unwrap(), "cat"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    // flock creates the pin file at once; wait until it holds the lock.
    let mut pinned = false;
    for _ in 0..200 {
        let l = s.json(&["cache", "list"]);
        if l.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == ids[0].as_str() && e["pinned"] == true)
        {
            pinned = true;
            break;
        }
        std::thread::yield_now();
    }
    let mut holder = holder;
    assert!(pinned, "the pin was never seen");
    let r = s.json(&["cache", "prune", "--max-bytes", "0"]);
    assert_eq!(r["pinned"], serde_json::json!([ids[0]]));
    assert_eq!(r["removed"], serde_json::json!([ids[1]]));
    assert!(Path::new(g0["path"].as_str().unwrap())
        .join("blob.bin")
        .is_file());
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());

    // Delete a version; gc frees its chunks and its cached copy.
    s.json(&["dataset", "get", &ids[2]]);
    let stats_before = s.json(&["stats"]);
    s.json(&["dataset", "delete", &ids[2]]);
    let gc = s.json(&["gc"]);
    assert!(gc["bytes_freed"].as_u64().unwrap() >= 3_000_000, "{gc}");
    assert_eq!(gc["cache_entries_removed"], 1, "{gc}");
    assert!(
        gc["cache_bytes_freed"].as_u64().unwrap() >= 3_000_000,
        "{gc}"
    );
    let stats_after = s.json(&["stats"]);
    assert!(
        stats_after["stored_bytes"].as_u64().unwrap()
            < stats_before["stored_bytes"].as_u64().unwrap()
    );
    let left = names(&s.json(&["cache", "list"]));
    assert!(!left.contains(&ids[2]));
    assert!(left.contains(&ids[0]));
}

#[test]
fn mount_serves_versions_read_only() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "FUSE is missing: scripts/setup installs fuse3; the mount tests need /dev/fuse"
    );
    let (s, v1) = occupancy_repo();
    std::fs::create_dir_all(s.path("data/notes")).unwrap();
    std::fs::write(s.path("data/notes/readme.md"), "rooms 1-3\n").unwrap();
    let v2 = s.json(&["dataset", "sync", "uci/occupancy", "data"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let copy = s.path("copy");
    s.json(&["dataset", "copy", &v2, "copy"]);

    let m1 = s.path("m1");
    let m2 = s.path("m2");
    let c1 = start_mount(&s, &v1, &m1);
    let c2 = start_mount(&s, &v2, &m2);

    // The whole tree equals a mutable copy.
    let d = Command::new("diff")
        .arg("-r")
        .arg(&m2)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        d.status.success(),
        "diff -r: {}",
        String::from_utf8_lossy(&d.stdout)
    );
    assert!(
        !m1.join("notes").exists(),
        "the first version has no notes/"
    );

    // Random-offset reads against the original file.
    let orig = std::fs::read(occupancy_dir().join("datatest2.txt")).unwrap();
    let f = std::fs::File::open(m1.join("datatest2.txt")).unwrap();
    let mut x: u64 = 12345;
    for _ in 0..3000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 33) as usize % orig.len();
        let len = 1 + (x >> 20) as usize % 9000;
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off as u64).unwrap();
        let end = (off + len).min(orig.len());
        assert_eq!(&buf[..n], &orig[off..end], "read at {off}+{len}");
    }
    drop(f);

    // Concurrent readers.
    std::thread::scope(|sc| {
        for t in 0..6 {
            let m = if t % 2 == 0 { &m1 } else { &m2 };
            sc.spawn(move || {
                for f in OCC {
                    let a = std::fs::read(m.join(f)).unwrap();
                    let b = std::fs::read(occupancy_dir().join(f)).unwrap();
                    assert_eq!(a, b, "{f} through {}", m.display());
                }
            });
        }
    });

    // Writes fail with EROFS.
    let e = std::fs::OpenOptions::new()
        .append(true)
        .open(m1.join("datatest.txt"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(30), "{e}");
    let e = std::fs::write(m1.join("new.txt"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(30), "{e}");
    assert_eq!(
        std::fs::read_to_string(m2.join("notes/readme.md")).unwrap(),
        "rooms 1-3\n"
    );

    stop_mount(c1, &m1);
    stop_mount(c2, &m2);
}

#[test]
fn bad_read_side_input_is_refused_cleanly() {
    let (s, _) = occupancy_repo();
    // Mount onto a non-empty folder, then onto a missing one.
    std::fs::create_dir_all(s.path("full")).unwrap();
    std::fs::write(s.path("full/keep.txt"), "mine").unwrap();
    let out = s.dsv(&["dataset", "mount", "uci/occupancy", "full"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not empty") && stderr(&out).contains("full"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(s.path("full/keep.txt")).unwrap(),
        "mine"
    );
    let out = s.dsv(&["dataset", "mount", "uci/occupancy", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));
    assert!(!s.path("missing").exists());
    // Unknown revisions.
    for args in [
        vec!["dataset", "get", "uci/nope"],
        vec!["dataset", "get", "uci/occupancy@9.9.9"],
        vec!["dataset", "copy", "uci/nope", "x"],
        vec!["dataset", "mount", "uci/nope", "full"],
        vec!["cache", "prune", "--version", "uci/nope"],
    ] {
        let out = s.dsv(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("nope") || stderr(&out).contains("9.9.9"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!s.path("x").exists());
    // Bad sizes.
    let out = s.dsv(&["cache", "budget", "lots"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("lots"));
    assert!(s.json(&["cache", "list"]).as_array().unwrap().is_empty());
}

/// A version of several files big enough that a kill lands mid-work.
fn blob_repo(files: u64, size: usize) -> (Sandbox, String) {
    let s = Sandbox::new();
    let d = s.path("blobs");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    for i in 0..files {
        let at = if i % 2 == 0 {
            d.join(format!("b{i}.bin"))
        } else {
            d.join(format!("sub/b{i}.bin"))
        };
        std::fs::write(at, dsv_tests::noise(500 + i, size)).unwrap();
    }
    let v = s.json(&["dataset", "sync", "big/blobs", d.to_str().unwrap()]);
    (s, v["id"].as_str().unwrap().to_string())
}

/// Every file of `got` has the bytes of the same file under `want`, and
/// nothing else is there.
fn same_tree(want: &Path, got: &Path) {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
    walk(want, want, &mut a);
    walk(got, got, &mut b);
    assert_eq!(
        a,
        b,
        "{} and {} list different files",
        want.display(),
        got.display()
    );
    for f in &a {
        assert!(
            std::fs::read(want.join(f)).unwrap() == std::fs::read(got.join(f)).unwrap(),
            "{} differs in {}",
            f.display(),
            got.display()
        );
    }
}

#[test]
fn destructive_targets_inside_or_above_the_repository_are_refused() {
    let (s, _) = occupancy_repo();
    let g = s.json(&["dataset", "get", "uci/occupancy"]);
    let cached = g["path"].as_str().unwrap().to_string();
    let dot = s.repo().join(".dsv");
    std::os::unix::fs::symlink(dot.join("packs"), s.path("packs-link")).unwrap();
    let repo = s.repo();
    let cases: Vec<(PathBuf, &str)> = vec![
        (PathBuf::from("."), "repository's folder"), // run inside the repository
        (repo.clone(), "repository's folder"),
        (s.dir.path().to_path_buf(), "contains the repository"),
        (PathBuf::from("/"), "contains the repository"),
        (dot.clone(), ".dsv"),
        (dot.join("packs"), ".dsv"),
        (dot.join("packs/new-folder"), ".dsv"),
        (s.path("packs-link"), ".dsv"),
        (PathBuf::from(&cached), "cache"),
        (dot.join("cache"), "cache"),
        (repo.join("data/../.dsv/db"), ".dsv"),
    ];
    for (target, why) in &cases {
        let t = target.to_str().unwrap();
        let out = s
            .cmd(&["dataset", "copy", "uci/occupancy", t, "--overwrite"])
            .current_dir(&repo)
            .output()
            .unwrap();
        let e = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "copy into {t} was not refused: {e}"
        );
        assert!(
            e.contains("refusing") && e.contains(t) && e.contains(why),
            "{t}: {e}"
        );
    }
    // A mount point inside .dsv is refused the same way.
    std::fs::create_dir_all(dot.join("mnt")).unwrap();
    let out = s.dsv(&[
        "dataset",
        "mount",
        "uci/occupancy",
        dot.join("mnt").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("refusing"), "{}", stderr(&out));
    std::fs::remove_dir(dot.join("mnt")).unwrap();
    // Nothing was lost: the repository checks clean, the data and the
    // cached copy are whole.
    let f = s.json(&["fsck", "--cache"]);
    assert_eq!(f["ok"], true, "{f}");
    files_equal(&occupancy_dir(), Path::new(&cached));
    files_equal(&occupancy_dir(), &s.path("data"));
    // An ordinary folder inside the work tree is fine.
    s.json(&[
        "dataset",
        "copy",
        "uci/occupancy",
        repo.join("work").to_str().unwrap(),
    ]);
    files_equal(&occupancy_dir(), &repo.join("work"));
}

#[test]
fn changed_cached_copies_are_detected_and_rebuilt() {
    let (s, v1) = blob_repo(6, 100_000);
    // v2 shares every file but one with v1.
    std::fs::write(s.path("blobs/extra.bin"), dsv_tests::noise(9, 1000)).unwrap();
    let v2 = s.json(&["dataset", "sync", "big/blobs", "blobs"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(s.path("blobs/extra.bin")).unwrap();
    let want = s.path("blobs");
    let g = s.json(&["dataset", "get", &v1]);
    let entry = PathBuf::from(g["path"].as_str().unwrap());
    // Each damage is done as the owner (root passes permission bits; an
    // ordinary owner first opens the folder/file for writing).
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&entry)
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {}", stderr(&out));
    };
    let damages: [(&str, &str); 8] = [
        ("in-place edit", "chmod u+w b0.bin && printf X | dd of=b0.bin bs=1 seek=10 conv=notrunc 2>/dev/null"),
        ("truncate", "chmod u+w b2.bin && truncate -s 0 b2.bin"),
        ("chmod + write + chmod back + old mtime",
         "chmod u+w b4.bin && printf Y | dd of=b4.bin bs=1 seek=5 conv=notrunc 2>/dev/null && chmod a-w b4.bin && touch -d @315532800 b4.bin"),
        ("replaced link", "chmod u+w . && cp b0.bin new.tmp && mv -f new.tmp b0.bin && chmod a-w ."),
        ("deleted file", "chmod u+w sub && rm -f sub/b1.bin && chmod a-w sub"),
        ("stray file", "chmod u+w . && echo stray > stray.txt && chmod a-w ."),
        ("renamed file", "chmod u+w sub && mv sub/b3.bin sub/b3.moved && chmod a-w sub"),
        ("permissions only", "chmod u+w sub/b5.bin"),
    ];
    for (what, script) in damages {
        sh(script);
        // fsck --cache names the entry and what changed.
        let out = s.dsv(&["--json", "fsck", "--cache"]);
        assert_eq!(out.status.code(), Some(2), "{what}: fsck --cache passed");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        let probs = r["cache"]["problems"].as_array().unwrap();
        assert!(
            probs.iter().any(|p| p["entry"] == v1.as_str()),
            "{what}: {r}"
        );
        // The next get rebuilds the copy, says so, and serves exact bytes.
        let out = s.dsv(&["--json", "dataset", "get", &v1]);
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains("rebuilt"), "{what}: {}", stderr(&out));
        let g: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(!g["repaired"].as_array().unwrap().is_empty(), "{what}: {g}");
        assert_eq!(g["path"].as_str().unwrap(), entry.to_str().unwrap());
        same_tree(&want, &entry);
        // The shared content was never linked into another version.
        let g2 = s.json(&["dataset", "get", &v2]);
        let p2 = PathBuf::from(g2["path"].as_str().unwrap());
        for i in 0..6 {
            let f = if i % 2 == 0 {
                format!("b{i}.bin")
            } else {
                format!("sub/b{i}.bin")
            };
            assert!(
                std::fs::read(p2.join(&f)).unwrap() == dsv_tests::noise(500 + i, 100_000),
                "{what}: {f} of the other version is wrong"
            );
        }
        let f = s.json(&["fsck", "--cache", "--read-data"]);
        assert_eq!(f["ok"], true, "{what}: {f}");
        // A repeated get is a lookup again.
        let again = s.json(&["dataset", "get", &v1]);
        assert_eq!(again["cached"], true, "{what}: {again}");
        assert!(again["repaired"].as_array().unwrap().is_empty(), "{what}");
    }
    // fsck --read-data includes the cache.
    let f = s.json(&["fsck", "--read-data"]);
    assert!(f["cache"]["bytes_read"].as_u64().unwrap() >= 600_000, "{f}");
}

#[test]
fn a_failed_copy_leaves_nothing_and_a_retry_succeeds() {
    let (s, id) = blob_repo(4, 300_000);
    let dsv = dsv_bin();
    // Writes beyond 200 KiB fail (EFBIG; SIGXFSZ ignored) part way through
    // each file.
    let limited = |args: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f 200; exec '{}' {args}",
                dsv.display()
            ))
            .env("DSV_REPO", s.repo())
            .current_dir(s.dir.path())
            .output()
            .unwrap()
    };
    let out = limited(&format!("dataset copy {id} work"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("File too large"), "{}", stderr(&out));
    assert!(!s.path("work").exists(), "a failed copy left its target");
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("dsv-copy"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // An existing empty target stays empty after a failure.
    std::fs::create_dir(s.path("empty")).unwrap();
    let out = limited(&format!("dataset copy {id} empty"));
    assert!(!out.status.success());
    assert_eq!(std::fs::read_dir(s.path("empty")).unwrap().count(), 0);
    // --overwrite keeps the old contents when the new copy fails.
    std::fs::create_dir(s.path("old")).unwrap();
    std::fs::write(s.path("old/mine.txt"), "mine").unwrap();
    let out = limited(&format!("dataset copy {id} old --overwrite"));
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read_to_string(s.path("old/mine.txt")).unwrap(),
        "mine"
    );
    // Retries succeed with exact bytes.
    for t in ["work", "empty"] {
        s.json(&["dataset", "copy", &id, t]);
        same_tree(&s.path("blobs"), &s.path(t));
    }
    s.json(&["dataset", "copy", &id, "old", "--overwrite"]);
    same_tree(&s.path("blobs"), &s.path("old"));
}

#[test]
fn killed_gets_and_copies_leave_a_clean_cache_and_retries_succeed() {
    let (s, id) = blob_repo(24, 2_000_000);
    let want = s.path("blobs");
    for (round, delay_ms) in [0u64, 2, 5, 10, 20, 40, 80, 150].into_iter().enumerate() {
        // get, killed part way.
        s.json(&["cache", "prune", "--max-bytes", "0"]);
        // prune (and gc) collect every temporary file of dead writers.
        let temps: Vec<_> = walk_names(&s.repo().join(".dsv/cache"))
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(temps.is_empty(), "round {round}: {temps:?}");
        let mut child = s
            .cmd(&["dataset", "get", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Only varies where the kill lands; correctness does not depend on it.
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let f = s.dsv(&["--json", "fsck", "--cache"]);
        assert!(
            f.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&f.stdout)
        );
        let g = s.json(&["dataset", "get", &id]);
        same_tree(&want, Path::new(g["path"].as_str().unwrap()));
        // The next get collected the dead writer's temporary files (but
        // those it may have been killed creating, before locking them:
        // `.init` files and `.mk-` folders, left to prune).
        let temps: Vec<_> = walk_names(&s.repo().join(".dsv/cache"))
            .into_iter()
            .filter(|n| n.starts_with('.') && !n.ends_with(".init") && !n.starts_with(".mk-"))
            .collect();
        assert!(temps.is_empty(), "round {round}: {temps:?}");

        // copy, killed part way: the target is absent or complete.
        let target = s.path(&format!("copy{round}"));
        let mut child = s
            .cmd(&["dataset", "copy", &id, target.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        if target.exists() {
            same_tree(&want, &target);
            std::fs::remove_dir_all(&target).unwrap();
        }
        s.json(&["dataset", "copy", &id, target.to_str().unwrap()]);
        same_tree(&want, &target);
        let staging: Vec<_> = std::fs::read_dir(s.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("dsv-copy") || n.contains("dsv-old"))
            .collect();
        assert!(staging.is_empty(), "round {round}: {staging:?}");
    }
    let f = s.json(&["fsck", "--cache", "--read-data"]);
    assert_eq!(f["ok"], true, "{f}");
}

fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk_names(&e.path()));
            }
        }
    }
    out
}
