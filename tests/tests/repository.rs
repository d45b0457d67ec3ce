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

fn pack_files(s: &Sandbox) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(s.repo().join(".dsv/packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect()
}

fn pack_bytes(s: &Sandbox) -> u64 {
    pack_files(s)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn fsck_repair_lets_a_resync_of_the_intact_files_heal_every_version() {
    let (s, data) = occupancy_sandbox();
    let v1 = s.json(&["dataset", "sync", "sensors/occ", data.to_str().unwrap()]);
    let rev = format!("sensors/occ@{}", v1["version"].as_str().unwrap());
    // Damage one byte in the middle of the pack (inside some chunk).
    let pack = pack_files(&s).pop().unwrap();
    dsv_tests::flip_middle_byte(&pack);

    let out = s.dsv(&["--json", "fsck", "--read-data", "--repair"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["problems"][0]["kind"], "corrupt-chunk", "{doc}");
    let marked = doc["repair"]["marked"].as_array().unwrap().clone();
    assert_eq!(marked.len(), 1, "{doc}");
    let chunk = marked[0].as_str().unwrap();
    assert!(
        stderr(&out).contains("sync intact copies"),
        "{}",
        stderr(&out)
    );

    // Until healed: fsck names the damaged chunk and the file to sync
    // again, and reads of that file fail naming the chunk.
    let quick = s.dsv(&["--json", "fsck"]);
    assert_eq!(quick.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&quick.stdout).unwrap();
    let p = &doc["problems"][0];
    assert_eq!(p["kind"], "damaged-chunk", "{doc}");
    assert_eq!(p["what"], chunk);
    let detail = p["detail"].as_str().unwrap();
    let damaged_file = [
        "datatest.txt",
        "datatest2.txt",
        "datatraining.txt",
        "README.md",
    ]
    .into_iter()
    .find(|f| detail.contains(&format!(":{f}")))
    .unwrap_or_else(|| panic!("names the file: {detail}"));
    let cat = s.dsv(&["dataset", "cat", &rev, damaged_file]);
    assert_eq!(cat.status.code(), Some(2));
    assert!(
        stderr(&cat).contains(chunk) && stderr(&cat).contains("damaged"),
        "{}",
        stderr(&cat)
    );

    // Syncing the intact folder stores the chunk again.
    let again = s.json(&["dataset", "sync", "sensors/occ", data.to_str().unwrap()]);
    assert_eq!(again["changed"], false, "{again}");
    assert!(again["stored_bytes"].as_u64().unwrap() > 0, "{again}");
    // The old version is whole and exact again, and fsck is clean.
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap();
        let cat = s.dsv(&["dataset", "cat", &rev, name]);
        assert_eq!(cat.status.code(), Some(0), "{name}: {}", stderr(&cat));
        assert!(cat.stdout == std::fs::read(&f).unwrap(), "{name} exact");
    }
    let fsck = s.json(&["fsck", "--read-data"]);
    assert_eq!(fsck["ok"], true, "{fsck}");
}

#[test]
fn a_killed_sync_leaves_orphans_that_dry_run_stats_and_gc_see_at_once() {
    let s = Sandbox::new();
    let big = s.path("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..4u64 {
        std::fs::write(
            big.join(format!("part{i}.bin")),
            dsv_tests::noise(i + 1, 32 << 20),
        )
        .unwrap();
    }
    let mut child = s
        .cmd(&["dataset", "sync", "big/data", big.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has written pack data (it commits only at the end).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pack_bytes(&s) < 8 << 20 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync ended too soon"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no pack data appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let on_disk = pack_bytes(&s);
    assert!(on_disk >= 8 << 20);
    assert_eq!(
        s.json(&["stats"])["versions"],
        0,
        "killed before its commit"
    );

    let stats = s.json(&["stats"]);
    assert!(stats["orphan_packs"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["orphan_bytes"], on_disk, "{stats}");
    let dry = s.json(&["gc", "--dry-run"]);
    assert_eq!(dry["orphan_bytes"], on_disk, "{dry}");
    assert_eq!(dry["bytes_freed"], on_disk, "{dry}");
    let real = s.json(&["gc"]);
    assert_eq!(real["bytes_freed"], dry["bytes_freed"], "{real}");
    assert_eq!(real["orphan_packs"], dry["orphan_packs"], "{real}");
    assert!(pack_files(&s).is_empty());
    assert_eq!(s.json(&["fsck", "--read-data"])["ok"], true);
}

#[test]
fn syncs_succeed_while_gc_runs_and_collects_concurrently() {
    let s = std::sync::Arc::new(Sandbox::new());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Background: make garbage, delete it, collect it — again and again.
    let bg = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let junk = s.path("junk");
            std::fs::create_dir_all(&junk).unwrap();
            let mut collected = 0u32;
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                round += 1;
                std::fs::write(junk.join("j.bin"), dsv_tests::noise(1000 + round, 1 << 20))
                    .unwrap();
                for args in [
                    vec!["dataset", "sync", "junk/j", junk.to_str().unwrap()],
                    vec!["dataset", "delete", "junk/j"],
                ] {
                    let out = s.dsv(&args);
                    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
                }
                let gc = s.json(&["gc"]);
                if gc["dead_chunks"].as_u64().unwrap() > 0 {
                    collected += 1;
                }
            }
            collected
        })
    };
    // Foreground: first syncs of new datasets and new versions of one.
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    for i in 0..30u64 {
        let dir = s.path(&format!("d{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.bin"), dsv_tests::noise(i + 1, 2 << 20)).unwrap();
        let name = if i % 2 == 0 {
            format!("p/new{i}")
        } else {
            "p/grows".to_string()
        };
        let out = s.dsv(&["dataset", "sync", &name, dir.to_str().unwrap()]);
        if !out.status.success() {
            failures.push(stderr(&out));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let collected = bg.join().unwrap();
    eprintln!(
        "30 syncs beside {collected} collecting gcs in {:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(collected > 0, "the gcs collected something meanwhile");
    assert_eq!(s.json(&["fsck", "--read-data"])["ok"], true);
}

/// Unmounts on drop.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn avail(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    stdout(&out).lines().nth(1).unwrap().trim().parse().unwrap()
}

#[test]
fn on_a_full_disk_dataset_delete_and_gc_free_space() {
    if !dsv_tests::is_root() {
        eprintln!("skipped: mounting a size-limited tmpfs needs root");
        return;
    }
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    if !ok {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let _mount = Mount(mnt.clone());
    let repo = mnt.join("repo");
    let dsv = |args: &[&str]| {
        Command::new(dsv_tests::dsv_bin())
            .args(args)
            .env("DSV_REPO", &repo)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let out = dsv(&["init", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reserve = repo.join(".dsv/reserve");
    assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 16 << 20);
    // Data from outside the small disk (packs on tmpfs are buffered: no
    // O_DIRECT there).
    let (big, small) = (outer.path().join("big"), outer.path().join("small"));
    std::fs::create_dir_all(&big).unwrap();
    std::fs::create_dir_all(&small).unwrap();
    std::fs::write(big.join("b.bin"), dsv_tests::noise(7, 24 << 20)).unwrap();
    std::fs::write(small.join("s.bin"), dsv_tests::noise(8, 1 << 20)).unwrap();
    for (name, dir) in [("t/big", &big), ("t/small", &small)] {
        let out = dsv(&["dataset", "sync", name, dir.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Fill the disk to the last byte.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(mnt.join("fill")).unwrap();
        for size in [1 << 20, 4096, 1] {
            let buf = vec![0xAAu8; size];
            while f.write_all(&buf).is_ok() {}
        }
    }
    assert_eq!(avail(&mnt), 0, "the disk is full");
    let out = dsv(&["dataset", "delete", "t/big"]);
    assert!(
        out.status.success(),
        "delete on a full disk: {}",
        stderr(&out)
    );
    let out = dsv(&["gc"]);
    assert!(out.status.success(), "gc on a full disk: {}", stderr(&out));
    assert!(avail(&mnt) > 20 << 20, "the big version's bytes are free");
    assert!(reserve.exists(), "the reserve is back once there is room");
    let out = dsv(&["fsck", "--read-data"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let cat = dsv(&["dataset", "cat", "t/small", "s.bin"]);
    assert!(cat.status.success(), "{}", stderr(&cat));
    assert!(cat.stdout == dsv_tests::noise(8, 1 << 20));
}

#[test]
fn fsck_rebuild_index_puts_an_intact_copy_back_in_service_and_rereads_the_remotes() {
    let (s, data) = occupancy_sandbox();
    let v1 = s.json(&["dataset", "sync", "sensors/occ", data.to_str().unwrap()]);
    let rev = format!("sensors/occ@{}", v1["version"].as_str().unwrap());
    let remote = s.path("remote");
    s.json(&["remote", "add", "origin", remote.to_str().unwrap()]);
    s.json(&["push"]);
    // An intact copy of the pack under another name (a pack the index
    // does not know), then one byte of the original damaged and the
    // damaged chunk taken out of service.
    let pack = pack_files(&s).pop().unwrap();
    let intact = dsv_tests::flip_middle_byte(&pack);
    std::fs::write(pack.with_file_name("00000000ffffffff.pack"), intact).unwrap();
    let out = s.dsv(&["--json", "fsck", "--read-data", "--repair"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["repair"]["marked"].as_array().unwrap().len(),
        1,
        "{doc}"
    );

    let out = s.dsv(&["--json", "fsck", "--rebuild-index", "--read-data"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{doc} {}", stderr(&out));
    assert_eq!(doc["ok"], true, "{doc}");
    let chunks = &doc["rebuilt"]["chunks"];
    assert_eq!(chunks["restored"], 1, "{doc}");
    assert_eq!(chunks["added"], 1, "{doc}");
    // The flipped byte lies in a record's data (a damaged record) or,
    // rarely, in a record header (the pack parsed up to it).
    let damaged = chunks["damaged_records"].as_u64().unwrap()
        + chunks["unreadable"].as_array().unwrap().len() as u64;
    assert_eq!(damaged, 1, "{doc}");
    let remotes = doc["rebuilt"]["remotes"].as_array().unwrap();
    assert_eq!(remotes.len(), 1, "{doc}");
    let on_remote = std::fs::read_dir(remote.join("packs")).unwrap().count();
    assert_eq!(remotes[0]["packs"], on_remote, "{doc}");
    assert!(remotes[0]["dropped_entries"].as_u64().unwrap() > 0, "{doc}");
    for f in std::fs::read_dir(&data).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap();
        let cat = s.dsv(&["dataset", "cat", &rev, name]);
        assert_eq!(cat.status.code(), Some(0), "{name}: {}", stderr(&cat));
        assert!(cat.stdout == std::fs::read(&f).unwrap(), "{name} exact");
    }
}
