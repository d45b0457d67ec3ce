//! End-to-end tests of the command-line contract (`../shared/design/cli.md`):
//! exit codes of argument errors, `--json` on every command, repository
//! discovery, names that must be refused, errors that name their cause,
//! drafts (list, show, files, discard, resolve after finalize), shell
//! completions, `stats` ratios, `preview` columns and `diff --json`.

use std::collections::BTreeSet;
use std::path::Path;

use dsv_tests::{occupancy_dir, stderr, stdout, Sandbox};
use serde_json::Value;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// Asserts a user error (exit 1) whose message contains every needle, and
/// that nothing was printed on stdout.
fn user_error(s: &Sandbox, args: &[&str], needles: &[&str]) -> String {
    let out = s.dsv(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?} printed {}", stdout(&out));
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected {n:?} in: {err}");
    }
    err
}

// ---- exit codes -------------------------------------------------------------

#[test]
fn argument_errors_exit_1_and_help_and_version_exit_0() {
    let s = Sandbox::new();
    for args in [
        vec!["--no-such-flag"],
        vec!["no-such-command"],
        vec!["dataset", "create"],
        vec!["dataset", "files", "p/n", "--added", "--removed"],
        vec!["--lock-timeout", "soon", "stats"],
        vec!["completions", "tcsh-like"],
        vec![],
    ] {
        let out = s.dsv(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} said nothing");
    }
    for args in [
        vec!["--help"],
        vec!["--version"],
        vec!["dataset", "--help"],
        vec!["help", "task"],
    ] {
        let out = s.dsv(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(!out.stdout.is_empty(), "{args:?} printed nothing");
    }
}

// ---- --json on every command ------------------------------------------------

/// The subcommands `dsv [path…] --help` lists (without `help`).
fn subcommands(s: &Sandbox, path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let out = s.dsv(&args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    let text = stdout(&out);
    let mut in_commands = false;
    let mut names = Vec::new();
    for line in text.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            if line.trim().is_empty() {
                break;
            }
            let name = line.split_whitespace().next().unwrap_or_default();
            if name != "help" {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Every leaf command, as space-separated paths (`dataset sync`, `trigger add task`).
fn leaf_commands(s: &Sandbox, path: &[&str], out: &mut BTreeSet<String>) {
    let subs = subcommands(s, path);
    if subs.is_empty() && !path.is_empty() {
        out.insert(path.join(" "));
    }
    for sub in subs {
        let mut p = path.to_vec();
        p.push(&sub);
        leaf_commands(s, &p, out);
    }
}

/// Runs `dsv --json ARGS`, asserts exit 0 and one JSON document on stdout.
fn json_ok(s: &Sandbox, covered: &mut BTreeSet<String>, key: &str, args: &[&str]) -> Value {
    covered.insert(key.to_string());
    s.json(args)
}

/// Runs `dsv --json ARGS` for a command that streams bytes: refused with
/// exit 1 and a message naming `--json`, nothing on stdout.
fn json_refused(s: &Sandbox, covered: &mut BTreeSet<String>, key: &str, args: &[&str]) {
    covered.insert(key.to_string());
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    user_error(s, &all, &["--json"]);
}

#[test]
fn every_command_prints_one_json_document_with_json() {
    let s = Sandbox::new();
    let mut c = BTreeSet::new();
    let c = &mut c;
    let root = s.path("small");
    write(&root.join("a.csv"), "x,y\n1,2\n3,4\n");
    write(&root.join("notes/b.txt"), "hello\n");
    let rootp = root.to_str().unwrap();
    // Occupancy data for the tasks and models.
    for (name, file) in [("train", "datatraining.txt"), ("test", "datatest.txt")] {
        let d = s.path(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(occupancy_dir().join(file), d.join(file)).unwrap();
        s.json(&[
            "dataset",
            "sync",
            &format!("occ/{name}"),
            d.to_str().unwrap(),
        ]);
    }

    // Repository commands.
    let other = s.path("other");
    json_ok(&s, c, "init", &["init", other.to_str().unwrap()]);
    let objrepo = s.path("objrepo");
    let objbucket = s.path("objbucket");
    json_ok(
        &s,
        c,
        "init --objects",
        &[
            "init",
            objrepo.to_str().unwrap(),
            "--objects",
            objbucket.to_str().unwrap(),
        ],
    );
    json_ok(&s, c, "snapshot", &["snapshot", rootp]);
    let v1 = id(&json_ok(
        &s,
        c,
        "dataset sync",
        &["dataset", "sync", "p/small", rootp],
    ));
    std::fs::rename(root.join("notes/b.txt"), root.join("notes/c.txt")).unwrap();
    let v2 = id(&s.json(&["dataset", "sync", "p/small", rootp]));

    // Drafts.
    let d = id(&json_ok(
        &s,
        c,
        "dataset create",
        &["dataset", "create", "p/small", "--from-latest"],
    ));
    json_ok(
        &s,
        c,
        "dataset add",
        &[
            "dataset",
            "add",
            &d,
            root.join("a.csv").to_str().unwrap(),
            "--dataset-path",
            "copy",
        ],
    );
    json_ok(&s, c, "dataset remove", &["dataset", "remove", &d, "notes"]);
    json_ok(&s, c, "dataset drafts", &["dataset", "drafts"]);
    json_ok(&s, c, "dataset show", &["dataset", "show", &d]);
    json_ok(&s, c, "dataset files", &["dataset", "files", &d]);
    let v3 = id(&json_ok(
        &s,
        c,
        "dataset finalize",
        &["dataset", "finalize", &d],
    ));
    let d2 = id(&s.json(&["dataset", "create", "p/small", "--from-latest"]));
    json_ok(&s, c, "dataset discard", &["dataset", "discard", &d2]);

    // Reading versions.
    json_ok(&s, c, "dataset list", &["dataset", "list"]);
    json_ok(&s, c, "dataset diff", &["dataset", "diff", &v1, &v2]);
    json_ok(
        &s,
        c,
        "dataset tag",
        &["dataset", "tag", &v3, "--add", "reviewed"],
    );
    json_ok(
        &s,
        c,
        "dataset meta",
        &["dataset", "meta", &v3, "--set", "k=1"],
    );
    json_ok(&s, c, "dataset preview", &["dataset", "preview", &v3]);
    json_ok(&s, c, "dataset verify", &["dataset", "verify", &v3]);
    let got = json_ok(&s, c, "dataset get", &["dataset", "get", &v3]);
    let copy = s.path("copy");
    json_ok(
        &s,
        c,
        "dataset copy",
        &["dataset", "copy", &v3, copy.to_str().unwrap()],
    );
    assert!(got["path"].is_string());
    json_ok(
        &s,
        c,
        "dataset squash",
        &["dataset", "squash", "p/flat", &v1, &v3],
    );
    json_ok(
        &s,
        c,
        "dataset rename",
        &["dataset", "rename", "p/flat", "p/flat2"],
    );
    json_ok(&s, c, "dataset delete", &["dataset", "delete", "p/flat2"]);
    json_refused(&s, c, "dataset cat", &["dataset", "cat", &v3, "a.csv"]);
    json_refused(&s, c, "completions", &["completions", "bash"]);

    // Tasks, agents, models.
    let t = id(&json_ok(
        &s,
        c,
        "task create",
        &[
            "task",
            "create",
            "occ/model",
            "--trainer",
            "tree",
            "--set",
            "General/dataset_id=occ/train",
            "--set",
            "General/test_dataset_id=occ/test",
            "--set",
            "General/label=Occupancy",
            "--set",
            "General/features=Temperature,Light,CO2",
        ],
    ));
    let t2 = id(&json_ok(
        &s,
        c,
        "task clone",
        &["task", "clone", &t, "--set", "Model/max_depth=2"],
    ));
    json_ok(
        &s,
        c,
        "task enqueue",
        &["task", "enqueue", &t, "--queue", "q"],
    );
    json_ok(&s, c, "agent", &["agent", "--once", "--queue", "q"]);
    json_ok(&s, c, "task run", &["task", "run", &t2]);
    let t3 = id(&s.json(&["task", "clone", &t]));
    s.json(&["task", "enqueue", &t3, "--queue", "never"]);
    json_ok(&s, c, "task abort", &["task", "abort", &t3]);
    let reaped = json_ok(&s, c, "task reap", &["task", "reap"]);
    assert_eq!(reaped["reaped"], serde_json::json!([]), "{reaped}");
    let shown = json_ok(&s, c, "task show", &["task", "show", &t]);
    assert_eq!(shown["status"], "completed", "{shown}");
    json_ok(&s, c, "task list", &["task", "list"]);
    let logs = json_ok(&s, c, "task logs", &["task", "logs", &t]);
    assert!(
        logs["log"].as_str().unwrap().contains("completed"),
        "{logs}"
    );
    let followed = s.json(&["task", "logs", &t, "--follow"]);
    assert_eq!(followed["log"], logs["log"]);
    let model = shown["models"][0].as_str().unwrap().to_string();
    json_ok(&s, c, "model list", &["model", "list"]);
    let m = json_ok(&s, c, "model show", &["model", "show", &model]);
    assert_eq!(m["label"], "Occupancy");
    json_ok(
        &s,
        c,
        "model tag",
        &["model", "tag", &model, "--add", "production"],
    );
    let test_file = occupancy_dir().join("datatest.txt");
    let p = json_ok(
        &s,
        c,
        "model predict",
        &["model", "predict", &model, test_file.to_str().unwrap()],
    );
    let h = json_ok(&s, c, "model history", &["model", "history", "occ/model"]);
    let kinds: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "model_tagged", "{h}");
    assert!(kinds.contains(&"model_created"), "{h}");
    let preds = p["predictions"].as_array().unwrap();
    assert_eq!(p["rows"].as_u64().unwrap() as usize, preds.len());
    assert!(
        preds.len() > 2000 && preds[0]["probability"].is_number(),
        "{}",
        preds[0]
    );

    // Triggers and events.
    json_ok(
        &s,
        c,
        "trigger add dataset",
        &[
            "trigger",
            "add",
            "dataset",
            "td",
            "--project",
            "occ",
            "--clone",
            &t,
        ],
    );
    json_ok(
        &s,
        c,
        "trigger add task",
        &[
            "trigger",
            "add",
            "task",
            "tt",
            "--project",
            "occ",
            "--promote",
        ],
    );
    json_ok(
        &s,
        c,
        "trigger add model",
        &[
            "trigger",
            "add",
            "model",
            "tm",
            "--tag",
            "production",
            "--clone",
            &t,
        ],
    );
    json_ok(&s, c, "trigger list", &["trigger", "list"]);
    json_ok(&s, c, "trigger run", &["trigger", "run", "--once"]);
    json_ok(&s, c, "trigger history", &["trigger", "history", "td"]);
    json_ok(&s, c, "trigger remove", &["trigger", "remove", "tm"]);
    json_ok(&s, c, "events", &["events"]);

    // Remotes (a folder remote: no server needed).
    let remote = s.path("remote");
    let remote = remote.to_str().unwrap();
    json_ok(&s, c, "remote add", &["remote", "add", "origin", remote]);
    json_ok(&s, c, "remote list", &["remote", "list"]);
    let pushed = json_ok(&s, c, "push", &["push"]);
    assert!(pushed["uploaded_bytes"].as_u64().unwrap() > 0, "{pushed}");
    json_ok(&s, c, "fetch", &["fetch"]);
    json_ok(&s, c, "pull", &["pull", "origin"]);
    json_ok(
        &s,
        c,
        "dataset prefetch",
        &["dataset", "prefetch", "p/small"],
    );
    let cloned = s.path("cloned");
    let cl = json_ok(&s, c, "clone", &["clone", remote, cloned.to_str().unwrap()]);
    assert!(!cl["datasets"].as_array().unwrap().is_empty(), "{cl}");
    json_ok(&s, c, "remote gc", &["remote", "gc", "--dry-run"]);
    json_ok(&s, c, "remote remove", &["remote", "remove", "origin"]);

    // Cache and repository.
    json_ok(&s, c, "cache list", &["cache", "list"]);
    json_ok(&s, c, "cache size", &["cache", "size"]);
    json_ok(&s, c, "cache budget", &["cache", "budget"]);
    json_ok(&s, c, "cache prune", &["cache", "prune", "--version", &v3]);
    let agents = json_ok(&s, c, "agent list", &["agent", "list"]);
    assert!(agents.is_array(), "{agents}");
    json_ok(&s, c, "stats", &["stats"]);
    json_ok(&s, c, "fsck", &["fsck"]);
    json_ok(&s, c, "gc", &["gc", "--dry-run"]);
    json_ok(&s, c, "upgrade", &["upgrade"]);

    // Long-running commands have their own tests: `dataset mount --json`
    // prints {"mountpoint", "id", "pid"} once mounted (readside.rs reads
    // it), `dataset watch --json` one document when it finalizes.
    // `serve --json` prints {"listening", "lines"} once listening
    // (serve.rs reads it).
    for long_running in ["dataset mount", "dataset watch", "serve"] {
        c.insert(long_running.to_string());
    }
    // `connect` needs PostgreSQL: team.rs runs it with --json.
    c.insert("connect".to_string());
    let mut all = BTreeSet::new();
    leaf_commands(&s, &[], &mut all);
    let missing: Vec<_> = all.difference(c).collect();
    assert!(
        missing.is_empty(),
        "commands not run with --json: {missing:?}"
    );
}

#[test]
fn model_show_is_human_without_json() {
    let s = Sandbox::new();
    let d = s.path("train");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        occupancy_dir().join("datatraining.txt"),
        d.join("datatraining.txt"),
    )
    .unwrap();
    s.json(&["dataset", "sync", "occ/train", d.to_str().unwrap()]);
    let t = id(&s.json(&[
        "task",
        "create",
        "occ/model",
        "--trainer",
        "tree",
        "--set",
        "General/dataset_id=occ/train",
        "--set",
        "General/label=Occupancy",
        "--set",
        "General/features=Light,CO2",
    ]));
    assert!(s.dsv(&["task", "run", &t]).status.success());
    let model = s.json(&["task", "show", &t])["models"][0]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.dsv(&["model", "show", &model]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        serde_json::from_str::<Value>(&text).is_err(),
        "JSON without --json: {text}"
    );
    assert!(
        text.contains(&model) && text.contains("Occupancy") && text.contains("Light, CO2"),
        "{text}"
    );
}

// ---- finding the repository -------------------------------------------------

#[test]
fn a_folder_with_another_tools_config_is_not_a_repository_and_stays_untouched() {
    let s = Sandbox::empty();
    let app = s.path("app");
    write(
        &app.join("config.json"),
        "{\"name\": \"my-app\", \"debug\": true}\n",
    );
    for args in [vec!["stats"], vec!["dataset", "list"], vec!["gc"]] {
        let mut all = vec!["--repo", app.to_str().unwrap()];
        all.extend(args.iter().copied());
        let err = user_error(&s, &all, &["no dsv repository at"]);
        assert!(!err.contains("corrupt"), "{err}");
    }
    let entries: Vec<_> = std::fs::read_dir(&app)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        entries,
        vec!["config.json"],
        "dsv created files in another tool's folder"
    );
}

#[test]
fn init_inside_a_repository_folder_is_refused_and_creates_nothing() {
    let s = Sandbox::new();
    let dot = s.repo().join(".dsv");
    let before: BTreeSet<_> = std::fs::read_dir(&dot)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    for target in [
        dot.clone(),
        dot.join("packs"),
        dot.join("new/deeper"),
        s.repo().join("x/../.dsv"),
    ] {
        user_error(
            &s,
            &["init", target.to_str().unwrap()],
            &["inside the repository folder"],
        );
    }
    let after: BTreeSet<_> = std::fs::read_dir(&dot)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after);
    assert!(!dot.join(".dsv").exists() && !dot.join("packs/.dsv").exists());
    // A sibling folder is fine.
    assert!(s
        .dsv(&["init", s.path("second").to_str().unwrap()])
        .status
        .success());
}

// ---- names, tags and paths --------------------------------------------------

#[test]
fn names_tags_and_dataset_paths_that_cannot_be_resolved_are_refused_at_creation() {
    let s = Sandbox::new();
    let folder = s.path("f");
    write(&folder.join("a.txt"), "a\n");
    let f = folder.to_str().unwrap();
    for name in [
        "../x", "p/..", "./p/x", "a@b/c", "p/a@b", "p//x", " p/x", "p/x ", "p/ x",
    ] {
        user_error(&s, &["dataset", "sync", name, f], &["invalid"]);
        user_error(&s, &["dataset", "create", name], &["invalid"]);
    }
    assert_eq!(
        s.json(&["dataset", "list"]),
        Value::Array(vec![]),
        "a refused name created a dataset"
    );
    for tag in ["1.0.0", "v2.0.1", "abcdef12", " spaced", "a@b"] {
        user_error(
            &s,
            &["dataset", "sync", "p/x", f, "--tag", tag],
            &["invalid tag"],
        );
    }
    for dp in ["/abs/olute", ".dsv", "sub/.dsv", "../up", "a//b"] {
        user_error(
            &s,
            &["dataset", "sync", "p/x", f, "--dataset-path", dp],
            &["invalid dataset path"],
        );
    }
    user_error(
        &s,
        &["dataset", "sync", "p/x", f, "--version", " 1.0.0"],
        &["invalid version"],
    );
    assert_eq!(s.json(&["dataset", "list"]), Value::Array(vec![]));
    // What is accepted resolves.
    let v = s.json(&[
        "dataset",
        "sync",
        "p/x",
        f,
        "--tag",
        "reviewed",
        "--version",
        "2.0.0",
        "--dataset-path",
        "sub/dir",
    ]);
    assert_eq!(s.json(&["dataset", "show", "p/x@reviewed"])["id"], v["id"]);
    assert_eq!(
        s.json(&["dataset", "files", "p/x"])[0]["path"],
        "sub/dir/a.txt"
    );
    // A tag that looks like a version string would be shadowed by it.
    user_error(
        &s,
        &["dataset", "tag", "p/x", "--add", "2.0.0"],
        &["invalid tag '2.0.0'"],
    );
    let d = id(&s.json(&["dataset", "create", "p/x", "--from-latest"]));
    user_error(
        &s,
        &["dataset", "add", &d, f, "--dataset-path", "/etc"],
        &["invalid dataset path", "absolute"],
    );
}

// ---- errors that name their cause -------------------------------------------

#[test]
fn add_to_a_version_or_a_dataset_name_says_what_it_is_and_how_to_get_a_draft() {
    let s = Sandbox::new();
    let folder = s.path("f");
    write(&folder.join("a.txt"), "a\n");
    let f = folder.to_str().unwrap();
    let v = id(&s.json(&["dataset", "sync", "p/x", f]));
    let err = user_error(
        &s,
        &["dataset", "add", &v[..12], f],
        &["finalized", "p/x@1.0.0", "dsv dataset create p/x --parent"],
    );
    assert!(!err.contains("not found"), "{err}");
    let err = user_error(
        &s,
        &["dataset", "add", "p/x", f],
        &["not a draft id", "dsv dataset create p/x"],
    );
    assert!(!err.contains("hexadecimal"), "{err}");
    user_error(
        &s,
        &["dataset", "finalize", "p/x@1.0.0"],
        &["not a draft id"],
    );
    user_error(
        &s,
        &["dataset", "add", "abcdef0123", f],
        &["draft not found: abcdef0123", "dsv dataset drafts"],
    );
}

#[test]
fn lock_timeout_shows_a_human_time_and_age() {
    let s = Sandbox::new();
    let lock = s.repo().join(".dsv/lock");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lock)
        .unwrap();
    // Hold the lock the way a writer does: flock plus its holder line.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 125;
    std::fs::write(
        &lock,
        format!("dsv gc (pid 4242, since unix time {since})\n"),
    )
    .unwrap();
    // flock holds the lock itself (--close) until `cat` ends at EOF.
    let mut held = std::process::Command::new("flock")
        .args(["--exclusive", "--close"])
        .arg(&lock)
        .arg("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until flock holds it: a non-blocking attempt fails from then on.
    while std::process::Command::new("flock")
        .args(["--exclusive", "--nonblock"])
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        std::thread::yield_now();
    }
    let out = s.dsv(&["--lock-timeout", "0", "dataset", "create", "p/x"]);
    drop(held.stdin.take());
    assert!(held.wait().unwrap().success());
    drop(file);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("dsv gc (pid 4242, since 20"), "{err}");
    assert!(err.contains("min") && err.contains(" ago)"), "{err}");
    assert!(!err.contains("unix time"), "{err}");
}

#[test]
fn a_stale_fuse_mount_gets_a_fusermount_hint() {
    if !Path::new("/dev/fuse").exists() {
        panic!("FUSE is missing: scripts/setup installs fuse3; this test needs /dev/fuse");
    }
    let s = Sandbox::new();
    let folder = s.path("f");
    write(&folder.join("a.txt"), "a\n");
    s.json(&["dataset", "sync", "p/x", folder.to_str().unwrap()]);
    let at = s.path("mnt");
    std::fs::create_dir(&at).unwrap();
    let mut child = s
        .cmd(&["--json", "dataset", "mount", "p/x", at.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The JSON line is printed once the file system is mounted.
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with('{'), "mount said {line:?}");
    // Killed without unmounting: the mount point is left stale.
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = std::fs::metadata(&at).unwrap_err();
    assert_eq!(stale.raw_os_error(), Some(107), "{stale}");
    let outs = [
        s.dsv(&["dataset", "sync", "p/x", at.to_str().unwrap()]),
        s.dsv(&["dataset", "mount", "p/x", at.to_str().unwrap()]),
    ];
    let unmounted = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&at)
        .status();
    for out in outs {
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0));
        assert!(
            err.contains(&format!("hint: {} is a stale FUSE mount", at.display()))
                && err.contains(&format!("fusermount3 -u {}", at.display())),
            "{err}"
        );
    }
    assert!(unmounted.unwrap().success());
}

// ---- drafts -----------------------------------------------------------------

#[test]
fn drafts_are_listed_shown_discarded_and_resolve_to_their_version() {
    let s = Sandbox::new();
    let folder = s.path("f");
    write(&folder.join("a.txt"), "a\n");
    let v1 = id(&s.json(&["dataset", "sync", "p/x", folder.to_str().unwrap()]));
    assert_eq!(s.json(&["dataset", "drafts"]), Value::Array(vec![]));

    let d = id(&s.json(&["dataset", "create", "p/x", "--parent", &v1]));
    let other = id(&s.json(&["dataset", "create", "q/y"]));
    let big = s.path("big.bin");
    // 3 MiB that compress badly and share nothing with anything stored.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&big, &bytes).unwrap();
    s.json(&["dataset", "add", &d, big.to_str().unwrap()]);

    let all = s.json(&["dataset", "drafts"]);
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    let mine = s.json(&["dataset", "drafts", "p/x"]);
    let mine = mine.as_array().unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["id"], d.as_str());
    assert_eq!(mine[0]["parents"][0], v1.as_str());
    assert_eq!(mine[0]["file_count"], 2);
    assert!(
        mine[0]["stored_bytes"].as_u64().unwrap() >= 3 << 20,
        "{}",
        mine[0]
    );
    assert!(mine[0]["created"].is_string());
    assert_eq!(
        s.json(&["dataset", "drafts", "q"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let human = stdout(&s.dsv(&["dataset", "drafts"]));
    assert!(
        human.contains(&d[..12]) && human.contains("p/x") && human.contains(&other[..12]),
        "{human}"
    );
    user_error(
        &s,
        &["dataset", "drafts", "nope"],
        &["no dataset or project named nope"],
    );

    // show and files work on an open draft.
    let shown = s.json(&["dataset", "show", &d[..10]]);
    assert_eq!(shown["draft"], true);
    assert_eq!(shown["file_count"], 2);
    let files: Vec<String> = s
        .json(&["dataset", "files", &d])
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(files, vec!["a.txt", "big.bin"]);

    // Discarding frees what only the draft held.
    let before = s.json(&["stats"])["stored_bytes"].as_u64().unwrap();
    let out = s.json(&["dataset", "discard", &d]);
    assert_eq!(out["discarded"], d.as_str());
    assert_eq!(s.json(&["dataset", "drafts", "p/x"]), Value::Array(vec![]));
    user_error(&s, &["dataset", "discard", &d], &["draft not found"]);
    let gc = s.json(&["gc"]);
    assert!(gc["bytes_freed"].as_u64().unwrap() >= 3 << 20, "{gc}");
    let after = s.json(&["stats"])["stored_bytes"].as_u64().unwrap();
    assert!(before - after >= 3 << 20, "stored {before} -> {after}");
    assert!(s.dsv(&["fsck"]).status.success());

    // After finalize the draft id names the version it became.
    let f = s.json(&["dataset", "finalize", &other]);
    let shown = s.json(&["dataset", "show", &other]);
    assert_eq!(shown["id"], f["id"]);
    assert_eq!(shown["finalized_from_draft"], other.as_str());
    let text = stdout(&s.dsv(&["dataset", "show", &other[..12]]));
    assert!(
        text.contains("finalized into this version") && text.contains(f["id"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(s.json(&["dataset", "files", &other]), Value::Array(vec![]));
    user_error(
        &s,
        &["dataset", "add", &other, folder.to_str().unwrap()],
        &[
            "already finalized into version q/y@1.0.0",
            "dsv dataset create q/y --parent",
        ],
    );
}

// ---- completions, stats, preview, diff ---------------------------------------

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    let s = Sandbox::empty();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = s.dsv(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        for word in [
            "dataset", "finalize", "drafts", "discard", "trigger", "--json",
        ] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
}

#[test]
fn stats_report_dedup_and_compression_separately() {
    let s = Sandbox::new();
    let folder = s.path("f");
    let text: String = (0..40_000).map(|i| format!("{i},{}\n", i % 7)).collect();
    write(&folder.join("a.csv"), &text);
    write(&folder.join("copy/a.csv"), &text);
    s.json(&["dataset", "sync", "p/x", folder.to_str().unwrap()]);
    let st = s.json(&["stats"]);
    let (logical, unique, stored) = (
        st["logical_bytes"].as_f64().unwrap(),
        st["unique_bytes"].as_f64().unwrap(),
        st["stored_bytes"].as_f64().unwrap(),
    );
    let dedup = st["dedup_ratio"].as_f64().unwrap();
    let comp = st["compression_ratio"].as_f64().unwrap();
    assert!(
        (dedup - 2.0).abs() < 0.01,
        "two copies of one file dedup 2x: {st}"
    );
    assert!((dedup - logical / unique).abs() < 1e-9, "{st}");
    assert!((comp - unique / stored).abs() < 1e-9 && comp > 2.0, "{st}");
    let human = stdout(&s.dsv(&["stats"]));
    assert!(
        human.contains("dedup ratio    2.00") && human.contains("compression"),
        "{human}"
    );
}

#[test]
fn preview_headers_line_up_and_wide_files_are_cut() {
    let s = Sandbox::new();
    let folder = s.path("f");
    // An unnamed leading row-index column, as R's write.csv writes.
    write(
        &folder.join("a.csv"),
        "\"t\",\"v\"\n\"1\",\"x\",10\n\"2\",\"y\",20\n",
    );
    let wide: Vec<String> = (0..20_000).map(|i| format!("column_{i}")).collect();
    let row: Vec<String> = (0..20_000).map(|i| i.to_string()).collect();
    write(
        &folder.join("wide.csv"),
        &format!("{}\n{}\n", wide.join(","), row.join(",")),
    );
    s.json(&["dataset", "sync", "p/x", folder.to_str().unwrap()]);
    let out = s.dsv(&["dataset", "preview", "p/x"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("== a.csv"))
        .unwrap();
    assert_eq!(lines[at + 1], "(index) | t | v");
    assert_eq!(lines[at + 2], "1 | x | 10");
    assert!(
        text.contains("19980 more columns not shown"),
        "{}",
        &text[..text.len().min(2000)]
    );
    assert!(text.contains("statistics of 19980 more columns not shown"));
    let longest = lines.iter().map(|l| l.len()).max().unwrap();
    assert!(longest < 400, "a {longest}-byte line");
    assert!(text.len() < 10_000, "{} bytes of preview", text.len());
    // --json keeps every column, the header lined up with the rows.
    let j = s.json(&["dataset", "preview", "p/x"]);
    let a = &j["files"][0];
    assert_eq!(a["header"], serde_json::json!(["(index)", "t", "v"]));
    assert_eq!(j["files"][1]["header"].as_array().unwrap().len(), 20_000);
}

#[test]
fn diff_json_renamed_is_an_array_of_paths() {
    let s = Sandbox::new();
    let folder = s.path("f");
    write(&folder.join("old/name.txt"), "some content that moves\n");
    write(&folder.join("keep.txt"), "k\n");
    let v1 = id(&s.json(&["dataset", "sync", "p/x", folder.to_str().unwrap()]));
    std::fs::create_dir_all(folder.join("new")).unwrap();
    std::fs::rename(folder.join("old/name.txt"), folder.join("new/name.txt")).unwrap();
    let v2 = id(&s.json(&["dataset", "sync", "p/x", folder.to_str().unwrap()]));
    let d = s.json(&["dataset", "diff", &v1, &v2]);
    for key in ["added", "modified", "removed", "renamed"] {
        assert!(
            d[key].as_array().unwrap().iter().all(Value::is_string),
            "{key} is not an array of paths: {d}"
        );
    }
    assert_eq!(d["renamed"], serde_json::json!(["new/name.txt"]));
    assert_eq!(
        d["renames"],
        serde_json::json!([{"from": "old/name.txt", "to": "new/name.txt"}])
    );
}
