//! Format upgrades and feature flags, end to end: a repository written by
//! the previous format's `dsv` (a fixture) is refused until `dsv upgrade`,
//! then reads back byte-identical and takes new writes; unknown features in
//! `config.json` are refused by class.

use std::path::Path;
use std::process::Command;

use dsv_tests::{dsv_unprivileged, is_root, stderr, stdout, Sandbox};

/// Unpacks the format-1 fixture into a fresh sandbox (`repo/` and the
/// source files beside it).
fn format1_sandbox() -> Sandbox {
    let s = Sandbox::empty();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/format1-repo.tar.gz");
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(s.dir.path())
        .status()
        .expect("tar runs")
        .success();
    assert!(ok, "cannot unpack {}", fixture.display());
    s
}

fn config(repo: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo.join(".dsv/config.json")).unwrap()).unwrap()
}

fn set_config(repo: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut c = config(repo);
    f(&mut c);
    std::fs::write(
        repo.join(".dsv/config.json"),
        serde_json::to_string_pretty(&c).unwrap(),
    )
    .unwrap();
}

fn cat(s: &Sandbox, rev: &str, path: &str) -> Vec<u8> {
    let out = s.dsv(&["dataset", "cat", rev, path]);
    assert!(out.status.success(), "cat {rev} {path}: {}", stderr(&out));
    out.stdout
}

#[test]
fn a_format1_repository_is_refused_until_upgraded_then_reads_back_and_takes_writes() {
    let s = format1_sandbox();
    let repo = s.repo();
    assert_eq!(config(&repo)["format_version"], 1);
    let expect = format!(
        "repository at {} has format 1; run `dsv upgrade`",
        repo.join(".dsv").parent().unwrap().display()
    );

    // Every command that opens it says what to do, with exit code 2.
    for args in [&["dataset", "list"][..], &["task", "list"], &["fsck"]] {
        let out = s.dsv(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(&expect), "{args:?}: {}", stderr(&out));
    }

    // An ordinary user who may read but not write the repository gets the
    // same message, and cannot upgrade it halfway.
    if is_root() {
        let before = dsv_tests::files_under(&repo.join(".dsv"));
        let ok = Command::new("chmod")
            .arg("a+rx")
            .arg(s.dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let out = dsv_unprivileged(&repo, &["dataset", "list"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(&expect), "{}", stderr(&out));
        let out = dsv_unprivileged(&repo, &["--json", "upgrade"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("Permission denied"),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            dsv_tests::files_under(&repo.join(".dsv")),
            before,
            "a refused upgrade changed nothing"
        );
    }

    let up = s.json(&["upgrade"]);
    assert_eq!(up["upgraded"], true, "{up}");
    assert_eq!(up["from"], 1);
    assert_eq!(up["to"], 2);
    assert_eq!(up["database_upgraded"], true);
    assert_eq!(up["config_rewritten"], true);
    let c = config(&repo);
    assert_eq!(c["format_version"], 2);
    assert_eq!(
        c["features"]["incompat"],
        serde_json::json!(["version-salt"])
    );
    assert_eq!(c["chunking"]["avg_size"], 65536, "settings kept");

    let fsck = s.json(&["fsck", "--read-data"]);
    assert_eq!(fsck["ok"], true, "{fsck}");
    assert_eq!(fsck["versions"], 3, "{fsck}");

    // Datasets, versions and tags as the old build wrote them, same bytes.
    let list = s.json(&["dataset", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let train = std::fs::read(s.path("train.csv")).unwrap();
    let test = std::fs::read(s.path("test.csv")).unwrap();
    assert_eq!(cat(&s, "occ/train@1.0.0", "train.csv"), train);
    assert_eq!(cat(&s, "occ/train@first", "train.csv"), train);
    assert_eq!(cat(&s, "occ/train@stable", "test.csv"), test);
    assert_eq!(cat(&s, "occ/train@1.0.1", "train.csv"), train);
    assert_eq!(
        cat(&s, "docs/readme", "README.txt"),
        std::fs::read(s.path("README.txt")).unwrap()
    );

    // Tasks, the model and the trigger.
    let tasks = s.json(&["task", "list"]);
    let statuses: Vec<&str> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2, "{tasks}");
    assert!(
        statuses.contains(&"completed") && statuses.contains(&"queued"),
        "{tasks}"
    );
    let models = s.json(&["model", "list"]);
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    let triggers = s.json(&["trigger", "list"]);
    assert_eq!(triggers.as_array().unwrap().len(), 1, "{triggers}");

    // The old draft finalizes, and a new version is made: both salted
    // (object format 2) beside the old unsalted ones.
    let drafts = s.json(&["dataset", "drafts"]);
    let draft = drafts[0]["id"].as_str().unwrap().to_string();
    let fin = s.json(&["dataset", "finalize", &draft]);
    assert_eq!(
        cat(&s, "docs/readme", "d.txt"),
        std::fs::read(s.path("draft.txt")).unwrap(),
        "{fin}"
    );
    let data = s.path("newdata");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(s.path("train.csv"), data.join("train.csv")).unwrap();
    std::fs::write(data.join("extra.csv"), b"a,b\n1,2\n").unwrap();
    s.json(&["dataset", "sync", "occ/train", data.to_str().unwrap()]);
    assert_eq!(cat(&s, "occ/train", "extra.csv"), b"a,b\n1,2\n");
    assert_eq!(s.json(&["dataset", "list"]).as_array().unwrap().len(), 5);

    let fsck = s.json(&["fsck", "--read-data"]);
    assert_eq!(fsck["ok"], true, "{fsck}");
    assert_eq!(fsck["versions"], 5, "{fsck}");

    // Again: a no-op.
    let again = s.json(&["upgrade"]);
    assert_eq!(again["upgraded"], false, "{again}");
    assert_eq!(again["from"], 2);
    let out = s.dsv(&["upgrade"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("already at format 2"),
        "{}",
        stdout(&out)
    );
    // Saying so needs no write access.
    if is_root() {
        let out = dsv_unprivileged(&repo, &["upgrade"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("already at format 2"),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn unknown_features_in_config_are_refused_by_class() {
    let s = Sandbox::new();
    let repo = s.repo();
    let data = s.path("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"one").unwrap();
    s.json(&["dataset", "sync", "p/d", data.to_str().unwrap()]);
    let shown = repo.display().to_string();

    // compat: ignored, writes work.
    set_config(&repo, |c| {
        c["features"]["compat"] = serde_json::json!(["zz-compat"])
    });
    std::fs::write(data.join("b.txt"), b"two").unwrap();
    s.json(&["dataset", "sync", "p/d", data.to_str().unwrap()]);

    // ro_compat: reads work, writes are refused naming the feature.
    set_config(&repo, |c| {
        c["features"]["ro_compat"] = serde_json::json!(["zz-ro"])
    });
    assert_eq!(s.json(&["dataset", "list"]).as_array().unwrap().len(), 2);
    assert_eq!(s.dsv(&["dataset", "cat", "p/d", "b.txt"]).stdout, b"two");
    std::fs::write(data.join("c.txt"), b"three").unwrap();
    let out = s.dsv(&["dataset", "sync", "p/d", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("zz-ro") && err.contains(&shown) && err.contains("upgrade dsv"),
        "{err}"
    );
    assert_eq!(s.json(&["dataset", "list"]).as_array().unwrap().len(), 2);

    // incompat: not opened at all, not even for reading.
    set_config(&repo, |c| {
        c["features"]["ro_compat"] = serde_json::json!([]);
        c["features"]["incompat"] = serde_json::json!(["version-salt", "zz-incompat"]);
    });
    for args in [&["dataset", "list"][..], &["upgrade"]] {
        let out = s.dsv(args);
        assert_eq!(out.status.code(), Some(2), "{args:?} {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("zz-incompat") && err.contains(&shown) && err.contains("upgrade dsv"),
            "{err}"
        );
    }
}
