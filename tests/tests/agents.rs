//! Many agents on one queue: every task runs exactly once, a killed
//! agent's task comes back through its lease, and a gc holding the
//! metadata store for a minute makes no live task fail or requeue.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dsv_tests::{dsv_bin, is_root, stderr, Sandbox};
use serde_json::Value;

const AGENTS: usize = 8;
const TASKS: usize = 500;
/// Short leases keep the recovery of the killed agent's task quick.
const LEASE_TTL_S: &str = "5";
/// The gc's commit transaction stays open this long (nobody can write).
const GC_HOLD_MS: &str = "60000";

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Waits (bounded) until `done` holds, checking every 50 ms.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent(s: &Sandbox, name: &str, queues: &[&str]) -> Child {
    let mut args = vec![
        "--lock-timeout",
        "600",
        "agent",
        "--name",
        name,
        "--requeue-dead",
        "--lease-ttl",
        LEASE_TTL_S,
    ];
    for q in queues {
        args.extend(["--queue", q]);
    }
    s.cmd(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An agent that believes it runs on another machine (its own UTS
/// namespace with another host name): this host cannot check its pid, so
/// only its lease tells whether it lives.
fn remote_agent(s: &Sandbox, queues: &[&str]) -> Child {
    let mut c = Command::new("unshare");
    c.args([
        "--uts",
        "sh",
        "-c",
        "hostname remote-machine && exec \"$0\" \"$@\"",
    ])
    .arg(dsv_bin())
    .args([
        "--lock-timeout",
        "600",
        "agent",
        "--name",
        "remote",
        "--lease-ttl",
        LEASE_TTL_S,
    ]);
    for q in queues {
        c.args(["--queue", q]);
    }
    c.env("DSV_REPO", s.repo())
        .env_remove("RUST_LOG")
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn task_id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn eight_agents_run_500_tasks_exactly_once_beside_a_killed_agent_and_a_minute_long_gc() {
    if !is_root() {
        // `unshare --uts` needs root; CI runs as root.
        eprintln!("skipped: needs root for a second host name");
        return;
    }
    let s = Sandbox::new();
    let runs = s.path("runs");
    let mark = s.path("victim-started");
    let release = s.path("victim-release");

    // The victim: on its first run it signals and then blocks (its agent is
    // killed meanwhile); on its second run it completes at once.
    let victim_cmd = format!(
        "if [ -e {m} ]; then exit 0; fi; touch {m}; while [ ! -e {r} ]; do sleep 0.05; done",
        m = mark.display(),
        r = release.display()
    );
    let victim = task_id(&s.json(&["task", "create", "load/victim", "--command", &victim_cmd]));
    s.json(&["task", "enqueue", &victim, "--queue", "victim"]);

    // 500 short tasks, each appending its id when it runs.
    let work_cmd = format!("echo \"$DSV_TASK_ID\" >> {}", runs.display());
    let base = task_id(&s.json(&["task", "create", "load/base", "--command", &work_cmd]));
    let repo = dsv::Repo::open(&s.repo().join(".dsv"), Default::default()).unwrap();
    let mut work = BTreeSet::new();
    for i in 0..TASKS {
        let t = repo
            .clone_task(&base, Some(&format!("t{i}")), &BTreeMap::new())
            .unwrap();
        repo.enqueue(&t.id, "work").unwrap();
        work.insert(t.id);
    }
    drop(repo);

    // The remote agent takes the victim and is killed while running it.
    let mut remote = remote_agent(&s, &["victim"]);
    wait_until("the victim to start", Duration::from_secs(120), || {
        mark.exists()
    });
    let mut agents: Vec<Child> = (0..AGENTS)
        .map(|i| agent(&s, &format!("a{i}"), &["work", "victim"]))
        .collect();
    remote.kill().unwrap(); // SIGKILL: no goodbye, only the lease tells
    remote.wait().unwrap();

    // A gc that holds the metadata store for a minute, once work is flowing.
    wait_until("the first runs", Duration::from_secs(300), || {
        lines(&runs).len() >= 50
    });
    let gc = s
        .cmd(&[
            "--json",
            "--lock-timeout",
            "600",
            "gc",
            "--hold-commit-ms",
            GC_HOLD_MS,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let gc_start = Instant::now();
    let runs_before = lines(&runs).len();
    let gc = gc.wait_with_output().unwrap();
    let held = gc_start.elapsed();
    let runs_after = lines(&runs).len();
    assert!(gc.status.success(), "gc: {}", stderr(&gc));
    // The gc really held the store for its minute while agents worked.
    assert!(held >= Duration::from_millis(60_000), "{held:?}");
    eprintln!(
        "gc held the store {held:?}; runs {runs_before} before, {runs_after} after, {TASKS} in all"
    );

    wait_until("every task to run", Duration::from_secs(900), || {
        lines(&runs).len() >= TASKS && s.json(&["task", "show", &victim])["status"] == "completed"
    });
    std::fs::write(&release, "").unwrap(); // the orphaned first run ends
    for a in &agents {
        assert!(Command::new("kill")
            .args(["-TERM", &a.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
    for a in agents.drain(..) {
        let out = a.wait_with_output().unwrap();
        assert!(out.status.success(), "agent: {}", stderr(&out));
    }

    // Why any task other than the victim was disturbed (shown on failure).
    let events = s.json(&["events", "-n", "100000"]);
    let disturbed: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["extra"])
        .filter(|e| e["task"] != victim.as_str() && !e["error"].is_null())
        .collect();
    // Exactly once: 500 runs, one per task.
    let ran = lines(&runs);
    let distinct: BTreeSet<String> = ran.iter().cloned().collect();
    assert_eq!(ran.len(), TASKS, "some task ran twice: {disturbed:?}");
    assert_eq!(distinct, work, "every task exactly once");
    // No live task failed or was requeued, the gc notwithstanding.
    let all = s.json(&["task", "list", "--project", "load"]);
    let mut statuses = BTreeMap::new();
    for t in all.as_array().unwrap() {
        let id = task_id(t);
        if id == base {
            continue;
        }
        *statuses
            .entry(t["status"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
        if work.contains(&id) {
            let full = s.json(&["task", "show", &id]);
            assert!(full["error"].is_null(), "a live task was disturbed: {full}");
        }
    }
    assert_eq!(
        statuses.get("completed"),
        Some(&(TASKS + 1)),
        "{statuses:?}"
    );
    // The victim came back through its expired lease (not a pid check: the
    // remote agent's host is not this one), once, and then completed.
    let v = s.json(&["task", "show", &victim]);
    assert_ne!(v["agent"]["name"], "remote", "{v}");
    let requeues: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["extra"])
        .filter(|e| e["task"] == victim.as_str() && e["status"] == "queued")
        .filter(|e| e["error"].as_str().is_some_and(|w| w.contains("requeued")))
        .collect();
    assert_eq!(requeues.len(), 1, "{requeues:?}");
    let why = requeues[0]["error"].as_str().unwrap();
    assert!(
        why.contains("lease") && why.contains("remote-machine"),
        "{why}"
    );
    // Nothing else was requeued or failed.
    assert!(disturbed.is_empty(), "{disturbed:?}");
}
