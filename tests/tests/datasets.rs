//! End-to-end tests of `dsv dataset …` driving the real binary: labeling
//! sessions of the occupancy data split by day, renames, merges, squash,
//! delete, watch, and bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use dsv_tests::{occupancy_dir, stderr, Sandbox};
use serde_json::Value;

/// Rows of an occupancy file grouped by day (`YYYY-MM-DD`), with its header.
fn rows_by_day(file: &str) -> (String, BTreeMap<String, Vec<String>>) {
    let text = std::fs::read_to_string(occupancy_dir().join(file)).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    let mut days: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let date = l.split(',').nth(1).unwrap().trim_matches('"');
        days.entry(date[..10].to_string())
            .or_default()
            .push(l.to_string());
    }
    (header, days)
}

/// Writes one CSV per day holding every row of `files` for that day.
fn write_days(dir: &Path, files: &[&str]) -> BTreeMap<String, String> {
    let mut merged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut header = String::new();
    for f in files {
        let (h, days) = rows_by_day(f);
        header = h;
        for (d, rows) in days {
            merged.entry(d).or_default().extend(rows);
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    let mut contents = BTreeMap::new();
    for (d, rows) in merged {
        let name = format!("day-{d}.csv");
        let body = format!("{header}\n{}\n", rows.join("\n"));
        std::fs::write(dir.join(&name), &body).unwrap();
        contents.insert(name, body);
    }
    contents
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn paths(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn three_labeling_sessions_by_day() {
    let s = Sandbox::new();
    let lab = s.path("labeled");
    let folder = lab.to_str().unwrap();

    // Session 1: the training days.
    let s1 = write_days(&lab, &["datatraining.txt"]);
    let v1 = s.json(&[
        "dataset",
        "sync",
        "sensors/occupancy",
        folder,
        "-m",
        "session 1",
    ]);
    assert_eq!(v1["version"], "1.0.0");
    assert_eq!(v1["delta"]["added"], s1.len() as u64);
    assert_eq!(
        strings(&v1["changes"]["added"]),
        s1.keys().cloned().collect()
    );

    // Session 2: the test days arrive; the day both files share changes.
    let s2 = write_days(&lab, &["datatraining.txt", "datatest.txt"]);
    let v2 = s.json(&["dataset", "sync", "sensors/occupancy", folder]);
    let added: BTreeSet<String> = s2
        .keys()
        .filter(|k| !s1.contains_key(*k))
        .cloned()
        .collect();
    let changed: BTreeSet<String> = s2
        .iter()
        .filter(|(k, b)| s1.get(*k).is_some_and(|old| old != *b))
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        !added.is_empty() && !changed.is_empty(),
        "the data has new and shared days"
    );
    assert_eq!(v2["version"], "1.0.1");
    assert_eq!(v2["parents"][0], v1["id"]);
    assert_eq!(strings(&v2["changes"]["added"]), added);
    assert_eq!(strings(&v2["changes"]["modified"]), changed);
    assert_eq!(v2["delta"]["removed"], 0);
    assert_eq!(v2["delta"]["added"], added.len() as u64);
    assert_eq!(v2["delta"]["modified"], changed.len() as u64);

    // Session 3: the second test period, tagged.
    let s3 = write_days(&lab, &["datatraining.txt", "datatest.txt", "datatest2.txt"]);
    let v3 = s.json(&[
        "dataset",
        "sync",
        "sensors/occupancy",
        folder,
        "--tag",
        "reviewed",
    ]);
    let added3: BTreeSet<String> = s3
        .keys()
        .filter(|k| !s2.contains_key(*k))
        .cloned()
        .collect();
    assert_eq!(strings(&v3["changes"]["added"]), added3);
    assert_eq!(v3["delta"]["modified"], 0);
    assert_eq!(v3["tags"][0], "reviewed");

    // A session that changed nothing creates nothing.
    let same = s.json(&["dataset", "sync", "sensors/occupancy", folder]);
    assert_eq!(same["changed"], false);
    assert_eq!(same["id"], v3["id"]);
    let list = s.json(&["dataset", "list", "sensors/occupancy"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(list[0]["id"], v3["id"], "newest first");
    let newest = s.json(&["dataset", "list", "sensors/occupancy", "--limit", "1"]);
    assert_eq!(newest.as_array().unwrap().len(), 1);
    assert_eq!(newest[0]["id"], v3["id"]);

    // Revisions: by version, tag, id prefix; files --added against a parent
    // and against another version; cat returns the bytes.
    let by_ver = s.json(&["dataset", "show", "sensors/occupancy@1.0.1"]);
    assert_eq!(by_ver["id"], v2["id"]);
    let by_tag = s.json(&["dataset", "show", "sensors/occupancy@reviewed"]);
    assert_eq!(by_tag["id"], v3["id"]);
    let prefix = &v1["id"].as_str().unwrap()[..10];
    assert_eq!(s.json(&["dataset", "show", prefix])["id"], v1["id"]);
    let added_vs_parent = s.json(&["dataset", "files", "sensors/occupancy@1.0.1", "--added"]);
    assert_eq!(paths(&added_vs_parent), added);
    let v1_id = v1["id"].as_str().unwrap();
    let added_vs_v1 = s.json(&[
        "dataset",
        "files",
        "sensors/occupancy",
        "--added",
        "--against",
        v1_id,
    ]);
    let expect: BTreeSet<String> = s3
        .keys()
        .filter(|k| !s1.contains_key(*k))
        .cloned()
        .collect();
    assert_eq!(paths(&added_vs_v1), expect);
    let day = s3.keys().next().unwrap();
    let out = s.dsv(&["dataset", "cat", "sensors/occupancy", day]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), s3[day]);

    // Preview: columns of the day files with statistics.
    let p = s.json(&[
        "dataset",
        "preview",
        "sensors/occupancy",
        "--max-files",
        "1",
    ]);
    let cols = p["files"][0]["columns"].as_array().unwrap();
    let temp = cols.iter().find(|c| c["name"] == "Temperature").unwrap();
    assert!(temp["min"].as_f64().unwrap() > 15.0 && temp["max"].as_f64().unwrap() < 30.0);
    assert_eq!(p["delta"]["added"], v3["delta"]["added"]);

    // Tags, metadata, verify.
    let t = s.json(&[
        "dataset",
        "tag",
        "sensors/occupancy@1.0.0",
        "--add",
        "baseline",
    ]);
    assert_eq!(t["tags"][0], "baseline");
    let m = s.json(&[
        "dataset",
        "meta",
        "sensors/occupancy",
        "--set",
        "labeler=ana",
        "--set",
        "rows=20560",
    ]);
    assert_eq!(m["labeler"], "ana");
    assert_eq!(m["rows"], 20560);
    let ver = s.json(&["dataset", "verify", "sensors/occupancy"]);
    assert_eq!(ver["ok"], true);
}

#[test]
fn renaming_a_folder_of_1000_files_stores_almost_nothing() {
    let s = Sandbox::new();
    let root = s.path("work");
    let dir = root.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let mut total = 0u64;
    for i in 0..1000u64 {
        // Distinct, poorly compressible content per file (~4 KiB).
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let body: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        total += body.len() as u64;
        std::fs::write(dir.join(format!("img-{i:04}.bin")), body).unwrap();
    }
    let w = root.to_str().unwrap();
    s.json(&["dataset", "sync", "vision/cams", w]);
    std::fs::rename(&dir, root.join("frames")).unwrap();
    let v = s.json(&["dataset", "sync", "vision/cams", w]);
    assert_eq!(v["delta"]["renamed"], 1000);
    assert_eq!(v["delta"]["added"], 0);
    assert_eq!(v["delta"]["removed"], 0);
    let stored = v["delta"]["stored_bytes"].as_u64().unwrap();
    assert!(stored * 100 < total, "stored {stored} bytes of {total}");
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|x| x.to_string()).collect()
}

fn draft(s: &Sandbox, args: &[&str]) -> String {
    s.json(args)["id"].as_str().unwrap().to_string()
}

#[test]
fn drafts_merges_squash_and_delete() {
    let s = Sandbox::new();
    let a = s.path("a");
    let b = s.path("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(a.join("shared.csv"), "x\n1\n").unwrap();
    std::fs::write(a.join("only-a.csv"), "x\n2\n").unwrap();
    std::fs::write(b.join("shared.csv"), "x\n3\n").unwrap();
    std::fs::write(b.join("only-b.csv"), "x\n4\n").unwrap();
    std::fs::write(b.join("notes.txt"), "skip me").unwrap();

    // Two datasets built through drafts.
    let da = draft(&s, &["dataset", "create", "p/a", "--version", "2.0.0"]);
    let add = s.json(&["dataset", "add", &da, a.to_str().unwrap()]);
    assert_eq!(add["added"], 2);
    let va = s.json(&["dataset", "finalize", &da]);
    assert_eq!(va["version"], "2.0.0");
    let db = draft(&s, &["dataset", "create", "p/b"]);
    let add = s.json(&[
        "dataset",
        "add",
        &db,
        b.to_str().unwrap(),
        "--wildcard",
        "*.csv",
        "--dataset-path",
        "sub",
    ]);
    assert_eq!(add["added"], 2, "the wildcard keeps the .txt out");
    let vb = s.json(&["dataset", "finalize", &db]);
    assert_eq!(vb["version"], "1.0.0");

    // Finalizing twice and adding to a finalized draft are user errors.
    let out = s.dsv(&["dataset", "finalize", &db]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already finalized"),
        "{}",
        stderr(&out)
    );
    let out = s.dsv(&["dataset", "add", &db, a.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));

    // A two-parent merge: later parent wins per path.
    let (ida, idb) = (va["id"].as_str().unwrap(), vb["id"].as_str().unwrap());
    let dm = draft(
        &s,
        &[
            "dataset", "create", "p/merged", "--parent", ida, "--parent", idb,
        ],
    );
    let vm = s.json(&["dataset", "finalize", &dm]);
    assert_eq!(vm["parents"].as_array().unwrap().len(), 2);
    let files = paths(&s.json(&["dataset", "files", "p/merged"]));
    let want = set(&[
        "only-a.csv",
        "shared.csv",
        "sub/only-b.csv",
        "sub/shared.csv",
    ]);
    assert_eq!(files, want);
    // The delta is recorded against the first parent.
    assert_eq!(vm["delta"]["added"], 2);

    // A writable copy of the merge: remove by pattern, modify, add.
    let dc = draft(&s, &["dataset", "create", "p/merged", "--from-latest"]);
    let rm = s.json(&["dataset", "remove", &dc, "sub/*.csv"]);
    assert_eq!(rm["removed"], 2);
    let out = s.dsv(&["dataset", "remove", &dc, "nothing-*.bin"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a pattern matching nothing is an error"
    );
    std::fs::write(a.join("shared.csv"), "x\n5\n").unwrap();
    std::fs::write(a.join("new.csv"), "x\n6\n").unwrap();
    s.json(&[
        "dataset",
        "add",
        &dc,
        a.join("shared.csv").to_str().unwrap(),
        a.join("new.csv").to_str().unwrap(),
    ]);
    let vc = s.json(&["dataset", "finalize", &dc]);
    assert_eq!(vc["version"], "1.0.1");
    let rev = "p/merged@1.0.1";
    assert_eq!(
        paths(&s.json(&["dataset", "files", rev, "--added"])),
        set(&["new.csv"])
    );
    assert_eq!(
        paths(&s.json(&["dataset", "files", rev, "--modified"])),
        set(&["shared.csv"])
    );
    assert_eq!(
        paths(&s.json(&["dataset", "files", rev, "--removed"])),
        set(&["sub/only-b.csv", "sub/shared.csv"])
    );
    // Against an unrelated version (p/b): everything of p/b not in vc is removed.
    let vs_b = s.json(&["dataset", "files", rev, "--removed", "--against", idb]);
    assert_eq!(paths(&vs_b), set(&["sub/only-b.csv", "sub/shared.csv"]));
    let d = s.json(&["dataset", "diff", idb, rev]);
    assert_eq!(d["removed"].as_array().unwrap().len(), 2);

    // Squash of three versions equals their union (later wins).
    let sq = s.json(&[
        "dataset",
        "squash",
        "p/all",
        ida,
        idb,
        vc["id"].as_str().unwrap(),
    ]);
    assert_eq!(sq["parents"].as_array().unwrap().len(), 0);
    let union = paths(&s.json(&["dataset", "files", "p/all"]));
    let want = set(&[
        "new.csv",
        "only-a.csv",
        "shared.csv",
        "sub/only-b.csv",
        "sub/shared.csv",
    ]);
    assert_eq!(union, want);
    let out = s.dsv(&["dataset", "cat", "p/all", "shared.csv"]);
    assert_eq!(out.stdout, b"x\n5\n");

    // Delete refuses a depended-on version; --force and a leaf work.
    let out = s.dsv(&["dataset", "delete", ida]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("parent of"), "{}", stderr(&out));
    assert!(
        s.json(&["dataset", "show", ida])["id"] == va["id"],
        "still there"
    );
    let del = s.json(&["dataset", "delete", "p/all"]);
    assert_eq!(del["deleted"], sq["id"]);
    let out = s.dsv(&["dataset", "show", "p/all"]);
    assert_eq!(out.status.code(), Some(1));
    // The squash's version and merged trees are now garbage.
    let gc = s.json(&["gc"]);
    assert!(gc["dead_objects"].as_u64().unwrap() >= 1, "{gc}");
    // Rename keeps the versions.
    s.json(&["dataset", "rename", "p/merged", "q/merged"]);
    assert_eq!(
        s.json(&["dataset", "show", "q/merged@1.0.1"])["id"],
        vc["id"]
    );
    assert_eq!(s.json(&["fsck"])["ok"], true);
}

#[test]
fn bad_input_is_a_clear_user_error_and_changes_nothing() {
    let s = Sandbox::new();
    let data = s.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.csv"), "x\n1\n").unwrap();
    s.json(&[
        "dataset",
        "sync",
        "p/d",
        data.to_str().unwrap(),
        "--tag",
        "gold",
    ]);
    let before = s.json(&["dataset", "list"]);
    let events_before = s.json(&["stats"]);
    for (args, needle) in [
        (
            vec!["dataset", "show", "nope/none"],
            "dataset not found: nope/none",
        ),
        (
            vec!["dataset", "show", "p/d@silver"],
            "no version or tag 'silver'",
        ),
        (vec!["dataset", "show", "ffffffffff"], "not found"),
        (vec!["dataset", "show", "p/d@"], "invalid revision"),
        (
            vec!["dataset", "sync", "p/d", "/does/not/exist"],
            "/does/not/exist",
        ),
        (
            vec![
                "dataset",
                "sync",
                "p/d",
                data.join("a.csv").to_str().unwrap(),
            ],
            "not a folder",
        ),
        (
            vec![
                "dataset",
                "sync",
                "p/d",
                data.to_str().unwrap(),
                "--dataset-path",
                "../up",
            ],
            "..",
        ),
        (
            vec!["dataset", "create", "p/d", "--version", "1.0.0"],
            "already has version 1.0.0",
        ),
        (vec!["dataset", "finalize", "0123456789"], "not found"),
        (vec!["dataset", "tag", "p/d", "--add", ""], "invalid tag"),
        (
            vec!["dataset", "meta", "p/d", "--get", "missing"],
            "no metadata key 'missing'",
        ),
    ] {
        let out = s.dsv(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let e = stderr(&out);
        assert!(
            e.starts_with("error: ") && e.contains(needle),
            "{args:?}: {e}"
        );
    }
    assert_eq!(s.json(&["dataset", "list"]), before);
    assert_eq!(s.json(&["stats"]), events_before);
}

#[test]
fn unreadable_file_fails_the_sync_and_changes_nothing() {
    let s = Sandbox::new();
    let data = s.path("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("ok.csv"), "x\n1\n").unwrap();
    std::fs::write(data.join("secret.csv"), "x\n2\n").unwrap();
    let repo = s.repo();
    dsv_tests::make_unreadable(s.dir.path(), &data.join("secret.csv"));
    let run = |args: &[&str]| dsv_tests::dsv_unprivileged(&repo, args);
    let out = run(&["dataset", "sync", "p/d", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("secret.csv"), "{}", stderr(&out));
    let out = run(&["--json", "dataset", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
}

/// Starts `dsv dataset watch` and waits until it reports it is watching.
fn start_watch(
    s: &Sandbox,
    folder: &Path,
    settle: &str,
) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = s
        .cmd(&[
            "dataset",
            "watch",
            "lab/session",
            folder.to_str().unwrap(),
            "--settle",
            settle,
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    wait_for(&mut err, "watching");
    (child, err)
}

/// Reads stderr lines until one contains `needle` (the watcher's own
/// report is the synchronization, not a sleep).
fn wait_for(err: &mut BufReader<std::process::ChildStderr>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        let n = err.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "watch exited before printing {needle:?}; saw {seen:?}"
        );
        let hit = line.contains(needle);
        seen.push(line);
        if hit {
            return seen;
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[test]
fn watch_adds_finished_files_and_resumes_after_kill_9() {
    let s = Sandbox::new();
    let folder = s.path("drop");
    std::fs::create_dir_all(&folder).unwrap();

    // First run: a file lands, is staged, then the watcher is killed hard.
    let (mut child, mut err) = start_watch(&s, &folder, "0.3");
    std::fs::write(folder.join("a.csv"), "x\n1\n").unwrap();
    wait_for(&mut err, "staged a.csv");
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert_eq!(
        s.json(&["dataset", "list"]),
        serde_json::json!([]),
        "nothing finalized yet"
    );

    // Second run resumes the same draft.
    let (child, mut err) = start_watch(&s, &folder, "1.5");
    std::fs::create_dir_all(folder.join("day2")).unwrap();
    std::fs::write(folder.join("day2/b.csv"), "x\n2\n").unwrap();
    wait_for(&mut err, "staged day2/b.csv");
    // A file still being written when the watcher stops is not stored.
    let mut half = std::fs::File::create(folder.join("half.csv")).unwrap();
    half.write_all(b"x\n3\n4\n").unwrap();
    half.flush().unwrap();
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = s.json(&["dataset", "show", "lab/session"]);
    assert_eq!(v["version"], "1.0.0");
    let files = paths(&s.json(&["dataset", "files", "lab/session"]));
    assert_eq!(files, set(&["a.csv", "day2/b.csv"]));
    let out = s.dsv(&["dataset", "cat", "lab/session", "day2/b.csv"]);
    assert_eq!(out.stdout, b"x\n2\n");
}

#[test]
fn syncing_the_folder_that_holds_the_repository_skips_the_repository() {
    let s = Sandbox::new();
    std::fs::write(s.repo().join("data.csv"), "x\n1\n").unwrap();
    let v = s.json(&["dataset", "sync", "p/here", s.repo().to_str().unwrap()]);
    assert_eq!(v["file_count"], 1);
    let files = paths(&s.json(&["dataset", "files", "p/here"]));
    assert_eq!(files, set(&["data.csv"]));
    // Unchanged folder (the repository changed by the sync itself): no version.
    let again = s.json(&["dataset", "sync", "p/here", s.repo().to_str().unwrap()]);
    assert_eq!(again["changed"], false);
}

#[test]
fn latest_is_the_last_finalized_version_and_versions_are_semantic() {
    let s = Sandbox::new();
    let d = s.path("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a.csv"), "x\n1\n").unwrap();
    let dir = d.to_str().unwrap();
    let v1 = s.json(&["dataset", "sync", "p/n", dir]);
    assert_eq!(v1["version"], "1.0.0");
    // Not a semantic version, or one the dataset has: refused, nothing written.
    std::fs::write(d.join("b.csv"), "x\n2\n").unwrap();
    for (bad, needle) in [("banana", "semantic version"), ("1.0.0", "already has")] {
        let out = s.dsv(&["dataset", "sync", "p/n", dir, "--version", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(bad) && stderr(&out).contains(needle),
            "{}",
            stderr(&out)
        );
        let out = s.dsv(&["dataset", "create", "p/n", "--version", bad]);
        assert_eq!(out.status.code(), Some(1), "{bad}: {}", stderr(&out));
    }
    assert_eq!(
        s.json(&["dataset", "list", "p/n"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A lower version finalized later is the latest.
    let low = s.json(&["dataset", "sync", "p/n", dir, "--version", "0.9.0"]);
    assert_eq!(low["version"], "0.9.0");
    assert_eq!(s.json(&["dataset", "show", "p/n"])["id"], low["id"]);
    let draft = s.json(&["dataset", "create", "p/n", "--from-latest"]);
    assert_eq!(draft["parents"][0], low["id"]);
    let add = s.json(&["dataset", "finalize", draft["id"].as_str().unwrap()]);
    assert_eq!(add["file_count"], 2, "no file dropped");
    assert_eq!(add["version"], "1.0.1", "next patch above the highest");
    let same = s.json(&["dataset", "sync", "p/n", dir]);
    assert_eq!(same["changed"], false);
}

#[test]
fn listing_a_project_includes_sub_projects() {
    let s = Sandbox::new();
    let d = s.path("d");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("a.csv"), "x\n1\n").unwrap();
    for name in ["a/b", "a/b/c", "a/bc"] {
        s.json(&["dataset", "sync", name, d.to_str().unwrap()]);
    }
    let names = |filter: &str| -> BTreeSet<String> {
        s.json(&["dataset", "list", filter])
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                format!(
                    "{}/{}",
                    v["project"].as_str().unwrap(),
                    v["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(names("a/b"), BTreeSet::from(["a/b".into(), "a/b/c".into()]));
    assert_eq!(names("a/b/c"), BTreeSet::from(["a/b/c".into()]));
    assert_eq!(names("a").len(), 3);
    let out = s.dsv(&["dataset", "list", "a/nope"]);
    assert_eq!(out.status.code(), Some(1));
}
