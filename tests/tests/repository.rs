//! End-to-end tests of the repository commands: init, snapshot, stats,
//! fsck, gc, the write lock and exit codes, on the real occupancy data.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use dsv_tests::{copy_files, occupancy_dir, stderr, stdout, Sandbox};

fn occupancy_sandbox() -> (Sandbox, std::path::PathBuf) {
    let s = Sandbox::new();
    let data = s.path("data");
    copy_files(&occupancy_dir(), &data);
    (s, data)
}

#[test]
fn init_twice_and_missing_repository_are_user_errors() {
    let s = Sandbox::new();
    let out = s.dsv(&["init", s.repo().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let empty = Sandbox::empty();
    let out = empty.dsv(&["stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: no dsv repository at"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn snapshot_stats_and_fsck_on_the_occupancy_data() {
    let (s, data) = occupancy_sandbox();
    let v = s.json(&["snapshot", data.to_str().unwrap(), "-m", "first"]);
    assert_eq!(v["changed"], true);
    assert_eq!(v["file_count"], 4);
    assert_eq!(v["delta"]["added"], 4);
    let stats = s.json(&["stats"]);
    for key in [
        "objects",
        "chunks",
        "logical_bytes",
        "stored_bytes",
        "dedup_ratio",
    ] {
        assert!(stats.get(key).is_some(), "stats lacks {key}: {stats}");
    }
    let readme = std::fs::metadata(data.join("README.md")).unwrap().len();
    assert_eq!(stats["logical_bytes"], 1_497_104 + readme);
    assert!(
        stats["stored_bytes"].as_u64().unwrap() < 1_497_104 / 2,
        "zstd compresses CSV: {stats}"
    );
    // Unchanged folder: nothing new.
    let again = s.json(&["snapshot", data.to_str().unwrap()]);
    assert_eq!(again["changed"], false);
    assert_eq!(again["id"], v["id"]);
    // Appending rows stores only the tail.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("datatest.txt"))
        .unwrap();
    std::io::Write::write_all(
        &mut f,
        b"\"9999\",\"2015-02-04 10:44:00\",21,27,0,500,0.004,0\n",
    )
    .unwrap();
    drop(f);
    let v2 = s.json(&["snapshot", data.to_str().unwrap()]);
    assert_eq!(v2["delta"]["modified"], 1);
    assert_eq!(v2["parents"][0], v["id"]);
    assert!(
        v2["delta"]["stored_bytes"].as_u64().unwrap() < 100_000,
        "{v2}"
    );
    let fsck = s.json(&["fsck", "--read-data"]);
    assert_eq!(fsck["ok"], true);
    assert!(fsck["bytes_read"].as_u64().unwrap() >= 1_497_104);
}

#[test]
fn fsck_names_a_corrupted_chunk_and_the_file_that_uses_it() {
    let (s, data) = occupancy_sandbox();
    s.json(&["snapshot", data.to_str().unwrap()]);
    let packs = s.repo().join(".dsv/packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&pack, &bytes).unwrap();
    let quick = s.dsv(&["fsck"]);
    assert_eq!(
        quick.status.code(),
        Some(0),
        "metadata is intact: {}",
        stderr(&quick)
    );
    let out = s.dsv(&["--json", "fsck", "--read-data"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    let problem = &doc["problems"][0];
    assert_eq!(problem["kind"], "corrupt-chunk");
    assert_eq!(
        problem["what"].as_str().unwrap().len(),
        64,
        "names the chunk id"
    );
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(".txt") || detail.contains("README"),
        "names the file: {detail}"
    );
    assert!(
        stderr(&out).starts_with("error: repository"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_held_write_lock_times_out_naming_the_holder_but_readers_proceed() {
    let (s, data) = occupancy_sandbox();
    s.json(&["snapshot", data.to_str().unwrap()]);
    let lock = s.repo().join(".dsv/lock");
    std::fs::write(&lock, "dsv dataset sync (pid 4242, since unix time 1)\n").unwrap();
    let mut holder = Command::new("flock")
        .arg(&lock)
        .args(["-c", "echo ready; read _"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flock(1) from util-linux");
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    std::fs::write(data.join("new.csv"), "a,b\n1,2\n").unwrap();
    let out = s.dsv(&["--lock-timeout", "1", "snapshot", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("dsv dataset sync (pid 4242"),
        "{}",
        stderr(&out)
    );
    // Readers are not blocked by the writer.
    let stats = s.dsv(&["stats"]);
    assert!(stats.status.success(), "{}", stderr(&stats));
    assert!(s.dsv(&["fsck"]).status.success());
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let v = s.json(&["snapshot", data.to_str().unwrap()]);
    assert_eq!(
        v["delta"]["added"], 1,
        "the timed-out write left nothing behind: {v}"
    );
}

#[test]
fn bad_folders_fail_cleanly_and_change_nothing() {
    let (s, data) = occupancy_sandbox();
    s.json(&["snapshot", data.to_str().unwrap()]);
    let before = s.json(&["stats"]);
    let missing = s.path("no-such-folder");
    let out = s.dsv(&["snapshot", missing.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a missing input folder is a user error"
    );
    assert!(stderr(&out).contains("no-such-folder"), "{}", stderr(&out));
    let out = s.dsv(&["snapshot", data.join("datatest.txt").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a folder"), "{}", stderr(&out));
    assert_eq!(s.json(&["stats"]), before);
    let gc = s.json(&["gc", "--dry-run"]);
    assert_eq!(gc["dead_chunks"], 0);
    assert_eq!(gc["dry_run"], true);
}

#[test]
fn an_unreadable_file_aborts_the_snapshot_naming_it() {
    let s = Sandbox::empty();
    let repo = s.repo();
    let data = s.path("data");
    copy_files(&occupancy_dir(), &data);
    let secret = data.join("secret.csv");
    std::fs::write(&secret, "x\n").unwrap();
    dsv_tests::make_unreadable(s.dir.path(), &secret);
    let wrap = |args: &[&str]| dsv_tests::dsv_unprivileged(&repo, args);
    let out = wrap(&["init", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = wrap(&["snapshot", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stderr(&out).contains("secret.csv"), "{}", stderr(&out));
    let stats = wrap(&["--json", "stats"]);
    let doc: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(doc["versions"], 0);
    assert_eq!(doc["chunks"], 0, "nothing was indexed");
}
