//! End-to-end tests of tasks, agents and models on the occupancy data:
//! clones on other versions, two agents sharing a queue, a command task, a
//! killed agent, SIGTERM, and bad input.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use dsv_tests::{occupancy_dir, stderr, Sandbox};
use serde_json::Value;

const FEATURES: &str = "General/features=Temperature,Humidity,Light,CO2,HumidityRatio";

/// One dataset per occupancy file: occ/train, occ/test1, occ/test2.
fn occupancy() -> Sandbox {
    let s = Sandbox::new();
    for (name, file) in [
        ("train", "datatraining.txt"),
        ("test1", "datatest.txt"),
        ("test2", "datatest2.txt"),
    ] {
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
    s
}

fn create(s: &Sandbox, extra: &[&str]) -> String {
    let mut args = vec![
        "task",
        "create",
        "occ/train",
        "--set",
        "General/label=Occupancy",
        "--set",
        FEATURES,
    ];
    args.extend_from_slice(extra);
    s.json(&args)["id"].as_str().unwrap().to_string()
}

fn show(s: &Sandbox, id: &str) -> Value {
    s.json(&["task", "show", id])
}

#[test]
fn clones_train_on_other_versions_and_produce_models() {
    let s = occupancy();
    let t = create(
        &s,
        &[
            "--trainer",
            "logistic",
            "--set",
            "General/dataset_id=occ/train",
            "--set",
            "General/test_dataset_id=occ/test1",
        ],
    );
    let out = s.dsv(&["task", "run", &t]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = show(&s, &t);
    assert_eq!(a["status"], "completed");
    assert!(
        a["metrics"]["test/accuracy"].as_f64().unwrap() >= 0.97,
        "{a}"
    );
    assert_eq!(a["models"].as_array().unwrap().len(), 1);
    assert!(a["started"].is_string() && a["finished"].is_string());

    // Clone onto another evaluation version with a tree.
    let c = s.json(&[
        "task",
        "clone",
        &t,
        "--set",
        "General/test_dataset_id=occ/test2",
        "--set",
        "General/model=tree",
        "--set",
        "Model/max_depth=3",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d = show(&s, &c);
    assert_eq!(d["status"], "draft");
    assert_eq!(d["parent"], t.as_str());
    s.json(&["task", "enqueue", &c, "--queue", "train"]);
    assert_eq!(show(&s, &c)["status"], "queued");
    s.json(&["agent", "--queue", "train", "--once"]);
    let b = show(&s, &c);
    assert_eq!(b["status"], "completed", "{b}");
    assert!(
        b["metrics"]["test/accuracy"].as_f64().unwrap() >= 0.99,
        "{b}"
    );
    assert_eq!(a["inputs"][0], b["inputs"][0], "same training version");
    assert_ne!(
        a["inputs"][1], b["inputs"][1],
        "different evaluation versions"
    );
    assert_ne!(a["metrics"], b["metrics"]);

    // A finished task is immutable: it cannot be queued again.
    let out = s.dsv(&["task", "enqueue", &t]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("clone"), "{}", stderr(&out));

    // Models: lineage, tags, prediction.
    let model = b["models"][0].as_str().unwrap();
    let m = s.json(&["model", "show", model]);
    assert_eq!(m["task"], c.as_str());
    assert_eq!(m["datasets"], b["inputs"]);
    assert_eq!(m["features"].as_array().unwrap().len(), 5);
    s.json(&["model", "tag", model, "--add", "production"]);
    let tagged = s.json(&["model", "list", "--tag", "production"]);
    assert_eq!(tagged.as_array().unwrap().len(), 1);
    let pred = s.dsv(&[
        "model",
        "predict",
        "occ/train@production",
        occupancy_dir().join("datatest2.txt").to_str().unwrap(),
    ]);
    assert!(pred.status.success(), "{}", stderr(&pred));
    let text = String::from_utf8(pred.stdout).unwrap();
    let truth: Vec<String> = std::fs::read_to_string(occupancy_dir().join("datatest2.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().to_string())
        .collect();
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), truth.len());
    let correct = rows
        .iter()
        .zip(&truth)
        .filter(|(r, t)| {
            r.split(',').nth(1).unwrap().parse::<f64>().unwrap() == t.parse::<f64>().unwrap()
        })
        .count();
    let acc = correct as f64 / truth.len() as f64;
    let reported = b["metrics"]["test/accuracy"].as_f64().unwrap();
    assert!(
        (acc - reported).abs() < 1e-9,
        "predict {acc} vs evaluation {reported}"
    );
    // The log tells what happened.
    let log = String::from_utf8(s.dsv(&["task", "logs", &c]).stdout).unwrap();
    assert!(
        log.contains("fitting tree") && log.contains("completed"),
        "{log}"
    );
}

#[test]
fn two_agents_run_each_task_exactly_once() {
    let s = occupancy();
    let base = create(
        &s,
        &[
            "--trainer",
            "naive_bayes",
            "--set",
            "General/dataset_id=occ/test1",
            "--set",
            "General/test_fraction=0.3",
        ],
    );
    let mut ids = BTreeSet::new();
    for i in 0..6 {
        let c = s.json(&[
            "task",
            "clone",
            &base,
            "--set",
            &format!("General/seed={i}"),
        ])["id"]
            .as_str()
            .unwrap()
            .to_string();
        s.json(&["task", "enqueue", &c, "--queue", "shared"]);
        ids.insert(c);
    }
    let agents: Vec<_> = (0..2)
        .map(|i| {
            s.cmd(&[
                "--json",
                "agent",
                "--queue",
                "shared",
                "--once",
                "--name",
                &format!("a{i}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let mut ran = Vec::new();
    for a in agents {
        let out = a.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        for r in v["ran"].as_array().unwrap() {
            ran.push(r.as_str().unwrap().to_string());
        }
    }
    ran.sort();
    let mut want: Vec<String> = ids.iter().cloned().collect();
    want.sort();
    assert_eq!(ran, want, "every task exactly once");
    for id in &ids {
        let t = show(&s, id);
        assert_eq!(t["status"], "completed", "{t}");
    }
}

#[test]
fn a_command_task_gets_data_and_parameters_and_reports_back() {
    let s = occupancy();
    let script = s.path("train.sh");
    std::fs::write(
        &script,
        r#"set -e
test -f "$DSV_DATASET_PATH/datatest.txt"
if echo x > "$DSV_DATASET_PATH/new.txt" 2>/dev/null; then echo "dataset is writable"; fi
rows=$(($(wc -l < "$DSV_DATASET_PATH/datatest.txt") - 1))
grep -q '"Model/depth": "4"' "$DSV_PARAMS"
echo "depth from env: $DSV_PARAM_MODEL_DEPTH"
echo "{\"name\": \"rows\", \"value\": $rows}" >> "$DSV_METRICS"
echo "{\"name\": \"loss\", \"value\": 0.5, \"step\": 1}" >> "$DSV_METRICS"
echo "{\"name\": \"loss\", \"value\": 0.25, \"step\": 2}" >> "$DSV_METRICS"
echo "model weights" > "$DSV_OUTPUT_DIR/weights.txt"
echo done
"#,
    )
    .unwrap();
    let t = s.json(&[
        "task",
        "create",
        "occ/custom",
        "--command",
        &format!("sh {}", script.display()),
        "--set",
        "General/dataset_id=occ/test1",
        "--set",
        "Model/depth=4",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.dsv(&["task", "run", &t]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = show(&s, &t);
    assert_eq!(v["status"], "completed", "{v}");
    assert_eq!(v["metrics"]["rows"], 2665.0);
    assert_eq!(v["metrics"]["loss"], 0.25);
    assert_eq!(
        v["scalars"]["loss"],
        serde_json::json!([[1, 0.5], [2, 0.25]])
    );
    assert_eq!(v["artifact_files"], serde_json::json!(["weights.txt"]));
    let art = v["artifacts"].as_str().unwrap();
    let cat = s.dsv(&["dataset", "cat", art, "weights.txt"]);
    assert_eq!(String::from_utf8(cat.stdout).unwrap(), "model weights\n");
    let log = String::from_utf8(s.dsv(&["task", "logs", &t]).stdout).unwrap();
    assert!(
        log.contains("depth from env: 4") && log.contains("done"),
        "{log}"
    );
    if !dsv_tests::is_root() {
        assert!(!log.contains("dataset is writable"), "{log}");
    }
    // A failing command fails the task with its exit code.
    let f = s.json(&[
        "task",
        "create",
        "occ/bad",
        "--command",
        "echo oops >&2; exit 3",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.dsv(&["task", "run", &f]);
    assert_eq!(out.status.code(), Some(1));
    let v = show(&s, &f);
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("code 3"), "{v}");
    assert!(String::from_utf8(s.dsv(&["task", "logs", &f]).stdout)
        .unwrap()
        .contains("oops"));
}

fn wait_for(path: &Path) {
    // Poll the file system for the marker the task writes; bounded.
    for _ in 0..20_000 {
        if path.exists() {
            return;
        }
        std::thread::yield_now();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn a_killed_agent_never_leaves_its_task_running() {
    let s = occupancy();
    let started = s.path("started");
    let release = s.path("release");
    let cmd = format!(
        "touch {}; while [ ! -f {} ]; do sleep 0.05; done",
        started.display(),
        release.display()
    );
    let t = s.json(&["task", "create", "occ/slow", "--command", &cmd])["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.json(&["task", "enqueue", &t]);
    let mut agent = s
        .cmd(&["agent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&started);
    assert_eq!(show(&s, &t)["status"], "running");
    agent.kill().unwrap(); // SIGKILL
    agent.wait().unwrap();
    std::fs::write(&release, "").unwrap(); // let the orphaned command end
    s.json(&["agent", "--once"]);
    let v = show(&s, &t);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["error"].as_str().unwrap().contains("died"), "{v}");

    // SIGTERM: the current command is stopped and the task marked aborted.
    let started2 = s.path("started2");
    let cmd = format!(
        "touch {}; while true; do sleep 0.05; done",
        started2.display()
    );
    let t2 = s.json(&["task", "create", "occ/forever", "--command", &cmd])["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.json(&["task", "enqueue", &t2]);
    let agent = s
        .cmd(&["agent"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&started2);
    assert!(Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = agent.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v = show(&s, &t2);
    assert_eq!(v["status"], "aborted", "{v}");

    // Abort of a queued task removes it from its queue.
    let q = s.json(&["task", "create", "occ/never", "--command", "true"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.json(&["task", "enqueue", &q]);
    s.json(&["task", "abort", &q]);
    let r = s.json(&["agent", "--once"]);
    assert!(r["ran"].as_array().unwrap().is_empty());
    assert_eq!(show(&s, &q)["status"], "aborted");
}

#[test]
fn bad_training_input_fails_the_task_with_the_cause() {
    let s = occupancy();
    // An empty dataset (only a non-tabular file).
    std::fs::create_dir_all(s.path("empty")).unwrap();
    std::fs::write(s.path("empty/notes.md"), "nothing").unwrap();
    s.json(&["dataset", "sync", "occ/empty", "empty"]);
    // A non-numeric cell.
    std::fs::create_dir_all(s.path("dirty")).unwrap();
    std::fs::write(
        s.path("dirty/d.csv"),
        "Temperature,Humidity,Light,CO2,HumidityRatio,Occupancy\n1,2,3,4,5,0\n1,2,n/a,4,5,1\n",
    )
    .unwrap();
    s.json(&["dataset", "sync", "occ/dirty", "dirty"]);
    let events_before = s.json(&["dataset", "list"]).as_array().unwrap().len();
    for (sets, cause) in [
        (
            vec![
                "General/dataset_id=occ/train",
                "General/features=Light,Noise",
            ],
            "no column 'Noise'",
        ),
        (
            vec!["General/dataset_id=occ/dirty"],
            "'n/a' is not a number",
        ),
        (vec!["General/dataset_id=occ/empty"], "no CSV/TSV file"),
        (
            vec!["General/dataset_id=occ/train", "General/label=Temperature"],
            "classes",
        ),
        (vec!["General/dataset_id=occ/nope"], "occ/nope"),
    ] {
        let mut args = vec![
            "task",
            "create",
            "occ/bad",
            "--trainer",
            "logistic",
            "--set",
            "General/label=Occupancy",
        ];
        for x in &sets {
            args.push("--set");
            args.push(x);
        }
        let mut id = s.json(&args)["id"].as_str().unwrap().to_string();
        if let Some(m) = sets.iter().find_map(|x| x.strip_prefix("General/model=")) {
            // --trainer sets the model; a clone overrides it.
            let o = format!("General/model={m}");
            id = s.json(&["task", "clone", &id, "--set", &o])["id"]
                .as_str()
                .unwrap()
                .to_string();
        }
        let out = s.dsv(&["task", "run", &id]);
        assert_eq!(out.status.code(), Some(1), "{sets:?}");
        let v = show(&s, &id);
        assert_eq!(v["status"], "failed");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(cause), "{sets:?}: {e}");
        assert!(v["models"].as_array().unwrap().is_empty());
    }
    // Nothing else changed: no new versions, no models.
    assert_eq!(
        s.json(&["dataset", "list"]).as_array().unwrap().len(),
        events_before
    );
    assert!(s.json(&["model", "list"]).as_array().unwrap().is_empty());
    // Unknown trainer at create time.
    let out = s.dsv(&["task", "create", "occ/x", "--trainer", "svm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("svm"));
    // An unknown model set by a clone is refused by the clone (the rule of
    // every definition), not found out when the task runs.
    let t = s.json(&[
        "task",
        "create",
        "occ/x",
        "--trainer",
        "logistic",
        "--set",
        "General/label=Occupancy",
    ])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.dsv(&["task", "clone", &t, "--set", "General/model=svm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown model 'svm'"),
        "{}",
        stderr(&out)
    );
}

/// Three separable groups labeled 2, 5 and 7, deterministic: row i of
/// group c sits at (3c, −3c) plus an offset in [−1, 1).
fn blobs(rows: usize, phase: usize) -> String {
    let mut s = String::from("a,b,kind\n");
    for i in 0..rows {
        let c = i % 3;
        let d = |k: usize| ((i * k + phase) % 200) as f64 / 100.0 - 1.0;
        s += &format!(
            "{:.3},{:.3},{}\n",
            3.0 * c as f64 + d(37),
            -3.0 * c as f64 + d(53),
            [2, 5, 7][c]
        );
    }
    s
}

#[test]
fn more_than_two_classes_train_evaluate_and_predict() {
    let s = Sandbox::new();
    for (name, rows, phase) in [("train", 600, 0), ("test", 300, 11)] {
        std::fs::create_dir_all(s.path(name)).unwrap();
        std::fs::write(s.path(&format!("{name}/blobs.csv")), blobs(rows, phase)).unwrap();
        s.json(&["dataset", "sync", &format!("mc/{name}"), name]);
    }
    for trainer in ["logistic", "tree", "forest", "naive_bayes"] {
        let t = s.json(&[
            "task",
            "create",
            "mc/model",
            "--trainer",
            trainer,
            "--set",
            "General/dataset_id=mc/train",
            "--set",
            "General/test_dataset_id=mc/test",
            "--set",
            "General/label=kind",
        ])["id"]
            .as_str()
            .unwrap()
            .to_string();
        let out = s.dsv(&["task", "run", &t]);
        assert!(out.status.success(), "{trainer}: {}", stderr(&out));
        let shown = show(&s, &t);
        assert_eq!(shown["status"], "completed", "{trainer}: {shown}");
        let m = &shown["metrics"];
        for k in ["test/accuracy", "test/f1", "test/roc_auc"] {
            assert!(m[k].as_f64().unwrap() > 0.97, "{trainer}: {k} in {m}");
        }
        assert!(m.get("test/tp").is_none(), "no binary counts: {m}");
        let model = shown["models"][0].as_str().unwrap();
        assert_eq!(
            s.json(&["model", "show", model])["classes"],
            serde_json::json!([2.0, 5.0, 7.0])
        );
        // Predictions are label values, with the predicted class's probability.
        std::fs::write(s.path("q.csv"), "a,b\n0.1,-0.2\n6.2,-5.9\n3.0,-3.1\n").unwrap();
        let pred = s.dsv(&["model", "predict", model, "q.csv"]);
        assert!(pred.status.success(), "{}", stderr(&pred));
        let text = String::from_utf8(pred.stdout).unwrap();
        let rows: Vec<(String, f64)> = text
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[1].to_string(), f[2].parse().unwrap())
            })
            .collect();
        let labels: Vec<f64> = rows.iter().map(|r| r.0.parse().unwrap()).collect();
        assert_eq!(labels, [2.0, 7.0, 5.0], "{trainer}: {text}");
        assert!(rows.iter().all(|r| r.1 > 1.0 / 3.0 && r.1 <= 1.0), "{text}");
    }
}

#[test]
fn an_aborted_in_process_forest_stops_between_trees() {
    let s = occupancy();
    // 5,000 trees: about a minute of fitting if nothing stopped it.
    let t = create(
        &s,
        &[
            "--trainer",
            "forest",
            "--set",
            "General/dataset_id=occ/train",
            "--set",
            "Model/n_estimators=5000",
        ],
    );
    s.json(&["task", "enqueue", &t]);
    let agent = s
        .cmd(&["agent", "--once"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The agent ships the log with each heartbeat: wait until it says the
    // fit began (bounded), then ask for the abort.
    let logs = || String::from_utf8(s.dsv(&["task", "logs", &t]).stdout).unwrap();
    let mut seen = false;
    for _ in 0..3_000 {
        if logs().contains("fitting forest") {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(seen, "the fit never started: {}", logs());
    s.json(&["task", "abort", &t]);
    let out = agent.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v = show(&s, &t);
    assert_eq!(v["status"], "aborted", "{v}");
    assert!(v["models"].as_array().is_none_or(|m| m.is_empty()), "{v}");
    let log = logs();
    assert!(
        log.contains("training cancelled after") && log.contains("of 5000 trees"),
        "{log}"
    );
}

#[test]
fn versions_a_model_stands_on_are_kept_and_its_lineage_never_points_at_nothing() {
    let s = occupancy();
    let train = s.json(&["dataset", "show", "occ/train"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = create(
        &s,
        &[
            "--trainer",
            "tree",
            "--set",
            &format!("General/dataset_id={train}"),
            "--set",
            "General/test_dataset_id=occ/test1",
        ],
    );
    let out = s.dsv(&["task", "run", &t]);
    assert!(out.status.success(), "{}", stderr(&out));
    let model = show(&s, &t)["models"][0].as_str().unwrap().to_string();

    // Without --force: refused, naming the task and the model.
    let out = s.dsv(&["dataset", "delete", "occ/train"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains(&t[..12]) && e.contains(&model[..12]), "{e}");
    // With --force: gone from the dataset, kept for the model.
    let del = s.json(&["dataset", "delete", "occ/train", "--force"]);
    assert_eq!(del["kept_for"].as_array().unwrap().len(), 2, "{del}");
    assert_eq!(
        s.dsv(&["dataset", "show", "occ/train"]).status.code(),
        Some(1)
    );
    s.json(&["gc"]);
    let kept = s.json(&["dataset", "show", &train]);
    assert_eq!(kept["deleted"], true);
    let lineage = s.json(&["model", "show", &model])["lineage"].clone();
    assert_eq!(lineage[0]["id"], train.as_str());
    assert!(
        lineage[0]["state"].as_str().unwrap().contains("kept"),
        "{lineage}"
    );
    assert_eq!(lineage[1]["state"], "live");
    // Its task still clones and trains on exactly that data.
    let c = s.json(&["task", "clone", &t])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = s.dsv(&["task", "run", &c]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (show(&s, &t), show(&s, &c));
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(a["metrics"], b["metrics"]);
    assert_eq!(b["inputs"][0], train.as_str());
}

#[test]
fn leakage_and_unknown_parameters_are_refused_at_definition() {
    let s = occupancy();
    let bad = [
        (
            [
                "--trainer",
                "logistic",
                "--set",
                "General/features=Light,Occupancy",
            ],
            "leakage",
        ),
        (
            ["--trainer", "tree", "--set", "Model/maxdepth=2"],
            "did you mean 'Model/max_depth'",
        ),
        (
            ["--trainer", "logistic", "--set", "Model/max_depth=2"],
            "Model/max_iter",
        ),
    ];
    for (extra, needle) in bad {
        let mut args = vec![
            "task",
            "create",
            "occ/m",
            "--set",
            "General/label=Occupancy",
        ];
        args.extend(extra.iter().copied());
        let out = s.dsv(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    assert!(s.json(&["task", "list"]).as_array().unwrap().is_empty());
    let t = create(
        &s,
        &["--trainer", "tree", "--set", "General/dataset_id=occ/train"],
    );
    let out = s.dsv(&["task", "clone", &t, "--set", "Model/max_dept=2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("did you mean 'Model/max_depth'"),
        "{}",
        stderr(&out)
    );
    let out = s.dsv(&["task", "clone", &t, "--set", "General/features=Occupancy"]);
    assert_eq!(out.status.code(), Some(1));
    s.json(&["task", "clone", &t, "--set", "Model/max_depth=2"]);
}

/// Every way a command could change its dataset; each line says whether the
/// attempt worked.
const ATTACKS: &str = r#"d="$DSV_DATASET_PATH"
f="$d/datatest.txt"
try() { if sh -c "$2" >/dev/null 2>&1; then echo "ATTACK-WORKED: $1"; else echo "attack-failed: $1"; fi; }
echo replacement > /tmp/dsv-attack-$$
try write "echo x >> '$f'"
try overwrite "echo x > '$f'"
try truncate "truncate -s 0 '$f'"
try chmod "chmod u+w '$f'"
try delete "rm '$f'"
try rename "mv '$f' '$d/moved.txt'"
try replace "mv -f /tmp/dsv-attack-$$ '$f'"
try create "echo x > '$d/new.txt'"
try folder-chmod "chmod u+w '$d'"
try content-file "for c in '$d'/../../files/*/*; do chmod u+w \$c && echo x >> \$c || exit 1; done"
try remount "mount -o remount,rw,bind '$d/../..'"
try unmount "umount -l '$d/../..'"
# Root cannot reach the agent's writable view through /proc (an ordinary
# user can reach its own other processes' views: see docs/ARCHITECTURE.md).
if [ "$(id -u)" = 0 ]; then try through-parent-root "echo x >> /proc/$PPID/root$f"; fi
rm -f /tmp/dsv-attack-$$
echo attacks-done
"#;

fn attack_and_check(s: &Sandbox, dataset: &str, file: &str, unprivileged: bool) {
    let script = s.path(&format!("attack-{dataset}.sh"));
    std::fs::write(&script, ATTACKS.replace("datatest.txt", file)).unwrap();
    let check = s.path(&format!("check-{dataset}.sh"));
    let original = occupancy_dir().join(file);
    std::fs::write(
        &check,
        format!(
            "cmp \"$DSV_DATASET_PATH/{file}\" '{}'\n",
            original.display()
        ),
    )
    .unwrap();
    let mut ids = Vec::new();
    for (name, sh) in [("attack", &script), ("check", &check)] {
        let t = s.json(&[
            "task",
            "create",
            &format!("occ/{name}-{dataset}"),
            "--command",
            &format!("sh {}", sh.display()),
            "--set",
            &format!("General/dataset_id=occ/{dataset}"),
        ])["id"]
            .as_str()
            .unwrap()
            .to_string();
        ids.push(t);
    }
    if unprivileged {
        dsv_tests::open_to_everyone(s.dir.path());
    }
    let run = |id: &str| {
        if unprivileged {
            dsv_tests::dsv_unprivileged(&s.repo(), &["task", "run", id])
        } else {
            s.dsv(&["task", "run", id])
        }
    };
    let out = run(&ids[0]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = String::from_utf8(s.dsv(&["task", "logs", &ids[0]]).stdout).unwrap();
    assert!(log.contains("attacks-done"), "{log}");
    assert!(!log.contains("ATTACK-WORKED"), "{log}");
    assert!(!log.contains("no read-only view"), "{log}");
    for a in [
        "write", "truncate", "chmod", "delete", "rename", "replace", "create",
    ] {
        assert!(log.contains(&format!("attack-failed: {a}")), "{a}: {log}");
    }
    // The next task and `get` receive the exact version.
    let out = run(&ids[1]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(show(s, &ids[1])["status"], "completed", "{}", stderr(&out));
    let g = s.json(&["dataset", "get", &format!("occ/{dataset}")]);
    assert!(g["repaired"].as_array().unwrap().is_empty(), "{g}");
    let p = Path::new(g["path"].as_str().unwrap()).join(file);
    assert!(std::fs::read(p).unwrap() == std::fs::read(&original).unwrap());
    if unprivileged {
        // Opening the sandbox to everyone (chmod -R) changed the copy of
        // occ/test1 made in the first round: fsck reports it, `get` heals it.
        let out = s.dsv(&["fsck", "--cache"]);
        assert_eq!(out.status.code(), Some(2), "{}", dsv_tests::stdout(&out));
        let g = s.json(&["dataset", "get", "occ/test1"]);
        assert!(!g["repaired"].as_array().unwrap().is_empty(), "{g}");
    }
    let out = s.dsv(&["--json", "fsck", "--cache", "--read-data"]);
    assert!(out.status.success(), "{}", dsv_tests::stdout(&out));
}

#[test]
fn a_command_task_cannot_change_its_dataset_even_as_root() {
    let s = occupancy();
    attack_and_check(&s, "test1", "datatest.txt", false);
    if dsv_tests::is_root() {
        // The same as an ordinary user that owns the cache's files.
        attack_and_check(&s, "test2", "datatest2.txt", true);
    }
}
