//! End-to-end tests of triggers: firing per matching version with templated
//! overrides, datasets created later, exactly-once across kill -9 of the
//! loop, metric thresholds, promotion, bad input.

use std::process::Stdio;

use dsv_tests::{occupancy_dir, stderr, Sandbox};
use serde_json::Value;

fn sync_file(s: &Sandbox, dataset: &str, folder: &str, file: &str, tag: &str) -> String {
    let d = s.path(folder);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(occupancy_dir().join(file), d.join(file)).unwrap();
    let v = s.json(&[
        "dataset",
        "sync",
        dataset,
        d.to_str().unwrap(),
        "--tag",
        tag,
    ]);
    v["id"].as_str().unwrap().to_string()
}

fn base_task(s: &Sandbox, extra: &[&str]) -> String {
    let mut args = vec![
        "task",
        "create",
        "occ/model",
        "--trainer",
        "logistic",
        "--set",
        "General/dataset_id=occ/train",
        "--set",
        "General/test_dataset_id=occ/eval",
        "--set",
        "General/label=Occupancy",
        "--set",
        "User/note=none",
        "--set",
        "General/features=Temperature,Humidity,Light,CO2,HumidityRatio",
    ];
    args.extend_from_slice(extra);
    s.json(&args)["id"].as_str().unwrap().to_string()
}

/// The first model a task produced.
fn model_of(s: &Sandbox, task: &str) -> String {
    s.json(&["task", "show", task])["models"][0]
        .as_str()
        .unwrap()
        .to_string()
}

/// A model's tags.
fn tags(s: &Sandbox, model: &str) -> Value {
    s.json(&["model", "show", model])["tags"].clone()
}

/// A draft clone of a task.
fn clone_task(s: &Sandbox, task: &str) -> String {
    s.json(&["task", "clone", task])["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn launched(s: &Sandbox, trigger: &str) -> Vec<Value> {
    s.json(&["trigger", "history", trigger])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn a_trigger_fires_once_per_matching_version_with_templated_overrides() {
    let s = Sandbox::new();
    sync_file(&s, "occ/eval", "eval", "datatest.txt", "reviewed");
    let base = base_task(&s, &[]);
    s.json(&[
        "trigger", "add", "dataset", "retrain", "--project", "occ", "--dataset", "train*", "--tag", "reviewed",
        "--clone", &base, "--set", "General/dataset_id=${dataset.id}",
        "--set", "User/note=trained on ${dataset.project}/${dataset.name}@${dataset.version} (${dataset.id})",
        "--queue", "q",
    ]);
    let v1 = sync_file(&s, "occ/train", "train", "datatraining.txt", "reviewed");
    // Ignored: wrong tag, wrong dataset name, other project.
    sync_file(&s, "occ/train", "train", "datatest2.txt", "unreviewed");
    sync_file(&s, "occ/other", "other", "datatest2.txt", "reviewed");
    sync_file(&s, "elsewhere/train", "else", "datatest2.txt", "reviewed");
    // A dataset created after the trigger, matching its filters.
    let v3 = sync_file(&s, "occ/train-extra", "extra", "datatest.txt", "reviewed");
    let fired = s.json(&["trigger", "run", "--once"]);
    assert_eq!(fired.as_array().unwrap().len(), 2, "{fired}");
    // Running again fires nothing more.
    assert!(s
        .json(&["trigger", "run", "--once"])
        .as_array()
        .unwrap()
        .is_empty());
    // Events the trigger ignores still move its cursor (in one write).
    sync_file(&s, "occ/other", "other", "datatraining.txt", "reviewed");
    assert!(s
        .json(&["trigger", "run", "--once"])
        .as_array()
        .unwrap()
        .is_empty());
    let last = s.json(&["events", "--last"])["last"].clone();
    assert_eq!(s.json(&["trigger", "list"])[0]["cursor"], last);
    let h = launched(&s, "retrain");
    let subjects: Vec<&str> = h.iter().map(|f| f["subject"].as_str().unwrap()).collect();
    assert_eq!(subjects, vec![v1.as_str(), v3.as_str()]);
    for (f, v) in h.iter().zip([&v1, &v3]) {
        let t = s.json(&["task", "show", f["task"].as_str().unwrap()]);
        assert_eq!(t["status"], "queued");
        assert_eq!(t["queue"], "q");
        assert_eq!(t["parent"], base.as_str());
        assert_eq!(t["params"]["General/dataset_id"], v.as_str());
        let note = t["params"]["User/note"].as_str().unwrap();
        assert!(
            note.starts_with("trained on occ/train") && note.ends_with(&format!("({v})")),
            "{note}"
        );
    }
    // The queued clones train on their versions.
    s.json(&["agent", "--queue", "q", "--once"]);
    let t = s.json(&["task", "show", h[0]["task"].as_str().unwrap()]);
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["inputs"][0], v1.as_str());
}

#[test]
fn killing_the_loop_never_loses_or_repeats_a_firing() {
    let s = Sandbox::new();
    sync_file(&s, "occ/eval", "eval", "datatest.txt", "x");
    let base = base_task(&s, &[]);
    s.json(&[
        "trigger",
        "add",
        "dataset",
        "t",
        "--project",
        "occ",
        "--dataset",
        "train",
        "--clone",
        &base,
        "--set",
        "General/dataset_id=${dataset.id}",
    ]);
    let dir = s.path("train");
    std::fs::create_dir_all(&dir).unwrap();
    let mut versions = Vec::new();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    for i in 0..20 {
        std::fs::write(dir.join("rows.csv"), format!("a,Occupancy\n{i},1\n")).unwrap();
        let v = s.json(&["dataset", "sync", "occ/train", dir.to_str().unwrap()]);
        versions.push(v["id"].as_str().unwrap().to_string());
        // Start the loop and kill it at a random point of its work.
        let mut child = s
            .cmd(&["trigger", "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(std::time::Duration::from_micros(x % 60_000));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    s.json(&["trigger", "run", "--once"]);
    let h = launched(&s, "t");
    let subjects: Vec<String> = h
        .iter()
        .map(|f| f["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        subjects, versions,
        "exactly one firing per version, in order"
    );
    let queued = s.json(&["task", "list", "--status", "queued"]);
    assert_eq!(queued.as_array().unwrap().len(), 20);
}

#[test]
fn task_thresholds_and_promotion() {
    let s = Sandbox::new();
    sync_file(&s, "occ/eval", "eval", "datatest.txt", "x");
    sync_file(&s, "occ/train", "train", "datatraining.txt", "x");
    let good = base_task(&s, &[]);
    let bad = base_task(&s, &["--set", "General/features=Temperature"]);
    s.json(&[
        "trigger",
        "add",
        "task",
        "above0",
        "--project",
        "occ",
        "--metric",
        "test/accuracy",
        "--above",
        "0",
        "--clone",
        &good,
    ]);
    s.json(&[
        "trigger",
        "add",
        "task",
        "below",
        "--project",
        "occ",
        "--metric",
        "test/accuracy",
        "--below",
        "0.5",
        "--clone",
        &good,
    ]);
    s.json(&[
        "trigger",
        "add",
        "task",
        "promote",
        "--project",
        "occ",
        // cli.md's form: `--promote` alone compares test/accuracy.
        "--promote",
    ]);
    // The worse model first: it becomes production (there is none yet).
    assert!(s.dsv(&["task", "run", &bad]).status.success());
    s.json(&["trigger", "run", "--once"]);
    let worse = model_of(&s, &bad);
    assert_eq!(tags(&s, &worse), serde_json::json!(["production"]));
    // The better one replaces it; the old one is 'previous'.
    assert!(s.dsv(&["task", "run", &good]).status.success());
    s.json(&["trigger", "run", "--once"]);
    let better = model_of(&s, &good);
    assert_eq!(tags(&s, &better), serde_json::json!(["production"]));
    assert_eq!(tags(&s, &worse), serde_json::json!(["previous"]));
    // A worse model again is not promoted.
    let again = clone_task(&s, &bad);
    assert!(s.dsv(&["task", "run", &again]).status.success());
    s.json(&["trigger", "run", "--once"]);
    let m = model_of(&s, &again);
    assert_eq!(tags(&s, &m), serde_json::json!([]));
    assert_eq!(tags(&s, &better), serde_json::json!(["production"]));
    let h = launched(&s, "promote");
    assert_eq!(h.len(), 3);
    assert!(
        h[2]["note"].as_str().unwrap().starts_with("not promoted"),
        "{}",
        h[2]
    );
    // Thresholds: above 0 fired for each of the 3 completed tasks; below 0.5 never.
    assert_eq!(launched(&s, "above0").len(), 3);
    assert!(launched(&s, "below").is_empty());
}

#[test]
fn bad_trigger_input_stores_nothing() {
    let s = Sandbox::new();
    let base = base_task(&s, &[]);
    s.json(&[
        "trigger",
        "add",
        "dataset",
        "ok",
        "--project",
        "occ",
        "--clone",
        &base,
    ]);
    for (args, needle) in [
        (vec!["--clone", "abcdef12"], "abcdef12"),
        (
            vec!["--clone", &base, "--set", "General/nope=1"],
            "General/nope",
        ),
        (
            vec![
                "--clone",
                &base,
                "--set",
                "General/dataset_id=${dataset.idd}",
            ],
            "dataset.idd",
        ),
        (
            vec!["--clone", &base, "--set", "General/dataset_id=${dataset.id"],
            "unterminated",
        ),
        // A placeholder dataset events cannot fill, refused at add.
        (
            vec!["--clone", &base, "--set", "General/dataset_id=${model.id}"],
            "cannot be filled by dataset events",
        ),
        // The rule of `task clone --set`: a misspelled hyperparameter.
        (
            vec!["--clone", &base, "--set", "Model/max_iters=5"],
            "did you mean 'Model/max_iter'",
        ),
    ] {
        let mut a = vec!["trigger", "add", "dataset", "bad", "--project", "occ"];
        a.extend(args.iter().copied());
        let out = s.dsv(&a);
        assert_eq!(out.status.code(), Some(1), "{a:?}");
        assert!(stderr(&out).contains(needle), "{a:?}: {}", stderr(&out));
    }
    let out = s.dsv(&[
        "trigger",
        "add",
        "dataset",
        "ok",
        "--project",
        "occ",
        "--clone",
        &base,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("'ok' exists"), "{}", stderr(&out));
    let list = s.json(&["trigger", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let out = s.dsv(&["trigger", "history", "nope"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn single_instance_defers_and_never_drops() {
    let s = Sandbox::new();
    let base = base_task(&s, &[]);
    s.json(&[
        "trigger",
        "add",
        "dataset",
        "one",
        "--project",
        "occ",
        "--dataset",
        "train",
        "--clone",
        &base,
        "--set",
        "General/dataset_id=${dataset.id}",
        "--single-instance",
    ]);
    let dir = s.path("train");
    std::fs::create_dir_all(&dir).unwrap();
    let mut versions = Vec::new();
    for i in 0..3 {
        std::fs::write(dir.join("rows.csv"), format!("a,Occupancy\n{i},1\n")).unwrap();
        versions.push(
            s.json(&["dataset", "sync", "occ/train", dir.to_str().unwrap()])["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The first launch is still queued: the other two versions wait.
    s.json(&["trigger", "run", "--once"]);
    let h = launched(&s, "one");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0]["subject"], versions[0].as_str());
    // Once it ran (it fails: no evaluation data), the next version fires, and so on.
    for n in 2..=3 {
        s.json(&["agent", "--once"]);
        s.json(&["trigger", "run", "--once"]);
        let h = launched(&s, "one");
        assert_eq!(h.len(), n);
        assert_eq!(h[n - 1]["subject"], versions[n - 1].as_str());
    }
}

#[test]
fn promote_if_better_gates_a_task_on_the_same_evaluation_data() {
    let s = Sandbox::new();
    sync_file(&s, "occ/eval", "eval", "datatest.txt", "x");
    sync_file(&s, "occ/eval2", "eval2", "datatest2.txt", "x");
    sync_file(&s, "occ/train", "train", "datatraining.txt", "x");
    let gate = ["--promote-if-better", "test/accuracy"];
    let mut args = vec!["--set", "General/features=Temperature"];
    args.extend_from_slice(&gate);
    let weak = base_task(&s, &args);
    assert!(s.dsv(&["task", "run", &weak]).status.success());
    let weak_model = model_of(&s, &weak);
    assert_eq!(tags(&s, &weak_model), serde_json::json!(["production"]));
    // A strong model evaluated on other data: production is re-evaluated
    // on that data before comparing, and loses.
    let mut args = vec!["--set", "General/test_dataset_id=occ/eval2"];
    args.extend_from_slice(&gate);
    let strong = base_task(&s, &args);
    let out = s.dsv(&["task", "run", &strong]);
    assert!(
        stderr(&out).contains("promoted: test/accuracy"),
        "{}",
        stderr(&out)
    );
    let strong_model = model_of(&s, &strong);
    assert_eq!(tags(&s, &strong_model), serde_json::json!(["production"]));
    assert_eq!(tags(&s, &weak_model), serde_json::json!(["previous"]));
    // The weak one again: not promoted.
    let again = clone_task(&s, &weak);
    let out = s.dsv(&["task", "run", &again]);
    assert!(stderr(&out).contains("not promoted"), "{}", stderr(&out));
    let m = model_of(&s, &again);
    assert_eq!(tags(&s, &m), serde_json::json!([]));
}

#[test]
fn a_lower_is_better_metric_promotes_the_model_with_the_smaller_loss() {
    let s = Sandbox::new();
    sync_file(&s, "occ/eval", "eval", "datatest.txt", "x");
    sync_file(&s, "occ/train", "train", "datatraining.txt", "x");
    let loss = |task: &str| {
        s.json(&["task", "show", task])["metrics"]["test/log_loss"]
            .as_f64()
            .unwrap()
    };
    let lower = ["--promote-if-better", "test/log_loss", "--lower-is-better"];
    let mut args = vec!["--set", "General/features=Temperature"];
    args.extend_from_slice(&lower);
    let weak = base_task(&s, &args);
    assert!(s.dsv(&["task", "run", &weak]).status.success());
    let strong = base_task(&s, &lower);
    let out = s.dsv(&["task", "run", &strong]);
    assert!(
        loss(&strong) < loss(&weak),
        "all five sensors beat temperature alone"
    );
    assert!(
        stderr(&out).contains("promoted: test/log_loss")
            && stderr(&out).contains("lower is better"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        tags(&s, &model_of(&s, &strong)),
        serde_json::json!(["production"])
    );
    // The weak model again, lower is better: not promoted.
    let again = clone_task(&s, &weak);
    let out = s.dsv(&["task", "run", &again]);
    assert!(stderr(&out).contains("not promoted"), "{}", stderr(&out));
    // The same comparison read as higher-is-better would promote it: the
    // direction is what decided.
    let mut args = vec!["--set", "General/features=Temperature"];
    args.extend_from_slice(&lower[..2]);
    let wrong_way = base_task(&s, &args);
    let out = s.dsv(&["task", "run", &wrong_way]);
    assert!(
        stderr(&out).contains("promoted: test/log_loss"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        tags(&s, &model_of(&s, &wrong_way)),
        serde_json::json!(["production"])
    );
    // --lower-is-better means nothing without a gate.
    let out = s.dsv(&[
        "task",
        "create",
        "occ/x",
        "--trainer",
        "logistic",
        "--lower-is-better",
    ]);
    // An argument error: exit 1 (2 is for repository problems).
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn the_event_log_lists_what_happened_in_order() {
    let s = Sandbox::new();
    assert_eq!(s.json(&["events", "--last"])["last"], 0);
    let v = sync_file(&s, "occ/eval", "eval", "datatest.txt", "x");
    let t = base_task(&s, &[]);
    s.json(&["task", "enqueue", &t]);
    let ev = s.json(&["events"]);
    let kinds: Vec<&str> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec![
            "dataset_created",
            "version_finalized",
            "task_status",
            "task_status"
        ]
    );
    let seqs: Vec<u64> = ev
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(ev[1]["version_id"], v.as_str());
    assert_eq!(ev[3]["extra"]["status"], "queued");
    assert_eq!(s.json(&["events", "--last"])["last"], 4);
    assert_eq!(
        s.json(&["events", "--after", "3"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
}
