//! The runtime driven directly as a library: an in-process agent with
//! executors registered by the test, abort and stop reaching a running
//! executor, the trigger loop, and a watch.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsv::{Action, Finish, Repo, SyncOptions, Task, TaskStatus, Trigger};
use dsv_runtime::{
    Agent, AgentEvents, AgentOptions, ExecContext, Executor, Executors, TriggerLoop,
    TriggerOptions, WatchEvents, WatchOptions, Watcher,
};

/// Bound of every wait on another thread: far above what any step takes,
/// only there so a broken runtime fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

fn repo_in(dir: &Path) -> Arc<Repo> {
    Arc::new(
        Repo::init(
            &dir.join(".dsv"),
            Default::default(),
            dsv_store::StoreOptions::default(),
        )
        .unwrap(),
    )
}

fn command_task(repo: &Repo, name: &str, params: &[(&str, &str)]) -> Task {
    let params: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    repo.create_task("p", name, "command", Some("exit 99".into()), params)
        .unwrap()
}

/// Doubles `Args/n` into the metric `answer`, and records what it ran.
#[derive(Clone, Default)]
struct Doubler {
    ran: Arc<Mutex<Vec<String>>>,
}

impl Executor for Doubler {
    fn run(&self, ctx: &ExecContext<'_>, task: &Task) -> Finish {
        self.ran.lock().unwrap().push(task.id.clone());
        let n: f64 = task.params["Args/n"].parse().unwrap();
        ctx.log(&format!("doubling {n}"));
        Finish {
            status: Some(TaskStatus::Completed),
            metrics: [("answer".to_string(), 2.0 * n)].into(),
            ..Default::default()
        }
    }
}

/// Records the agent's notifications.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl AgentEvents for Recorder {
    fn task_started(&self, t: &Task) {
        self.0.lock().unwrap().push(format!("started {}", t.id));
    }
    fn task_finished(&self, t: &Task) {
        self.0
            .lock()
            .unwrap()
            .push(format!("finished {} {}", t.id, t.status.as_str()));
    }
}

#[test]
fn an_agent_runs_a_queued_task_with_a_registered_executor_and_records_its_result() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let mine = command_task(&repo, "mine", &[("Args/n", "21")]);
    let other = command_task(&repo, "other", &[("Args/n", "1")]);
    repo.enqueue(&mine.id, "q1").unwrap();
    repo.enqueue(&other.id, "elsewhere").unwrap();

    let doubler = Doubler::default();
    let mut agent = Agent::new(
        repo.clone(),
        AgentOptions {
            name: Some("test-agent".into()),
            queues: vec!["q1".into()],
            once: true,
            ..Default::default()
        },
    )
    .unwrap();
    agent.register("command", doubler.clone());
    let events = Recorder::default();
    let report = agent.run(&AtomicBool::new(false), &events).unwrap();

    assert_eq!(report.ran, vec![mine.id.clone()]);
    assert_eq!(report.agent.name, "test-agent");
    assert_eq!(*doubler.ran.lock().unwrap(), vec![mine.id.clone()]);
    let done = repo.task(&mine.id).unwrap();
    assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
    assert_eq!(done.metrics["answer"], 42.0);
    assert_eq!(done.agent.as_ref().unwrap().name, "test-agent");
    let log = repo.task_log(&mine.id).unwrap();
    assert!(
        log.contains("doubling 21") && log.contains("dsv: completed"),
        "{log}"
    );
    assert_eq!(
        *events.0.lock().unwrap(),
        vec![
            format!("started {}", mine.id),
            format!("finished {} completed", mine.id)
        ]
    );
    // The other queue's task was left alone.
    assert_eq!(repo.task(&other.id).unwrap().status, TaskStatus::Queued);
}

#[test]
fn max_tasks_bounds_an_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let t = command_task(&repo, &format!("t{i}"), &[("Args/n", "1")]);
            repo.enqueue(&t.id, "default").unwrap();
            t.id
        })
        .collect();
    let mut agent = Agent::new(
        repo.clone(),
        AgentOptions {
            max_tasks: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    agent.register("command", Doubler::default());
    let report = agent.run(&AtomicBool::new(false), &()).unwrap();
    // Oldest first.
    assert_eq!(report.ran, ids[..2].to_vec());
    assert_eq!(repo.task(&ids[2]).unwrap().status, TaskStatus::Queued);
}

/// Signals that it started, then waits for the abort flag.
struct Waiter {
    started: Mutex<mpsc::Sender<String>>,
}

impl Executor for Waiter {
    fn run(&self, ctx: &ExecContext<'_>, task: &Task) -> Finish {
        self.started.lock().unwrap().send(task.id.clone()).unwrap();
        let deadline = Instant::now() + PATIENCE;
        while !ctx.aborted() {
            assert!(Instant::now() < deadline, "the abort never arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        ctx.log("saw the abort");
        Finish {
            status: Some(TaskStatus::Aborted),
            ..Default::default()
        }
    }
}

/// Runs one queued task with a [`Waiter`]; `interrupt` is called (with the
/// repository and the agent's stop flag) once the executor runs.
fn run_interrupted(interrupt: impl FnOnce(&Repo, &str, &AtomicBool)) -> Task {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let t = command_task(&repo, "long", &[]);
    repo.enqueue(&t.id, "default").unwrap();
    let (tx, rx) = mpsc::channel();
    let mut agent = Agent::new(
        repo.clone(),
        AgentOptions {
            once: true,
            heartbeat_every: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .unwrap();
    agent.register(
        "command",
        Waiter {
            started: Mutex::new(tx),
        },
    );
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let running = s.spawn(|| agent.run(&stop, &()));
        let id = rx
            .recv_timeout(PATIENCE)
            .expect("the executor never started");
        assert_eq!(id, t.id);
        assert_eq!(repo.task(&id).unwrap().status, TaskStatus::Running);
        interrupt(&repo, &id, &stop);
        running.join().unwrap().unwrap();
    });
    let done = repo.task(&t.id).unwrap();
    let log = repo.task_log(&t.id).unwrap();
    assert!(log.contains("saw the abort"), "{log}");
    done
}

#[test]
fn an_abort_request_reaches_the_running_executor() {
    let done = run_interrupted(|repo, id, _| {
        repo.abort_task(id).unwrap();
    });
    assert_eq!(done.status, TaskStatus::Aborted);
    assert_eq!(done.error.as_deref(), Some("aborted on request"));
}

#[test]
fn stopping_the_agent_aborts_its_running_task() {
    let done = run_interrupted(|_, _, stop| stop.store(true, Ordering::Release));
    assert_eq!(done.status, TaskStatus::Aborted);
    assert_eq!(
        done.error.as_deref(),
        Some("the agent was stopped (SIGTERM/SIGINT)")
    );
}

struct Panics;

impl Executor for Panics {
    fn run(&self, _: &ExecContext<'_>, _: &Task) -> Finish {
        panic!("model library bug")
    }
}

#[test]
fn a_panicking_executor_fails_its_task_not_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let a = command_task(&repo, "a", &[]);
    let b = command_task(&repo, "b", &[]);
    repo.enqueue(&a.id, "default").unwrap();
    repo.enqueue(&b.id, "default").unwrap();
    let mut agent = Agent::new(
        repo.clone(),
        AgentOptions {
            once: true,
            ..Default::default()
        },
    )
    .unwrap();
    agent.register("command", Panics);
    let report = agent.run(&AtomicBool::new(false), &()).unwrap();
    assert_eq!(report.ran.len(), 2);
    for id in [&a.id, &b.id] {
        let t = repo.task(id).unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert!(
            t.error.as_deref().unwrap().contains("model library bug"),
            "{t:?}"
        );
    }
}

#[test]
fn a_task_of_a_kind_without_executor_fails_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let t = command_task(&repo, "a", &[]);
    repo.enqueue(&t.id, "default").unwrap();
    let mut only_trainer = Executors::empty();
    only_trainer.register("trainer", dsv_runtime::TrainerExecutor);
    let agent = Agent::new(
        repo.clone(),
        AgentOptions {
            once: true,
            ..Default::default()
        },
    )
    .unwrap()
    .with_executors(only_trainer);
    agent.run(&AtomicBool::new(false), &()).unwrap();
    let t = repo.task(&t.id).unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    let e = t.error.unwrap();
    assert!(
        e.contains("no executor for tasks of kind 'command'") && e.contains("trainer"),
        "{e}"
    );
}

#[test]
fn the_command_executor_runs_the_command_contract() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let t = repo
        .create_task(
            "p",
            "cmd",
            "command",
            Some(
                r#"echo "n is $DSV_PARAM_ARGS_N"; echo '{"name":"m","value":3,"step":1}' >> "$DSV_METRICS"; echo out > "$DSV_OUTPUT_DIR/o.txt""#
                    .into(),
            ),
            [("Args/n".to_string(), "7".to_string())].into(),
        )
        .unwrap();
    let done = dsv_runtime::run_task(
        &repo,
        &Executors::default(),
        &t.id,
        &dsv_runtime::agent_info(Some("here".into())).unwrap(),
        &AtomicBool::new(false),
        &(),
    )
    .unwrap();
    assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
    assert_eq!(done.metrics["m"], 3.0);
    assert_eq!(done.scalars["m"], vec![(1, 3.0)]);
    assert_eq!(done.artifact_files, vec!["o.txt".to_string()]);
    assert!(repo.task_log(&t.id).unwrap().contains("n is 7"));
}

#[test]
fn the_trigger_loop_clones_and_enqueues_on_a_new_dataset_version() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let template = command_task(&repo, "train", &[("General/dataset_id", "")]);
    repo.add_trigger(Trigger {
        name: "retrain".into(),
        on: "dataset".into(),
        project: Some("sensors".into()),
        dataset: None,
        tags: Vec::new(),
        events: Vec::new(),
        statuses: Vec::new(),
        threshold: None,
        action: Action::Clone {
            task: template.id.clone(),
            overrides: [(
                "General/dataset_id".to_string(),
                "${dataset.id}".to_string(),
            )]
            .into(),
            queue: "train".into(),
        },
        single_instance: false,
        cursor: 0,
        created_ms: 0,
    })
    .unwrap();
    let lp = TriggerLoop::new(
        repo.clone(),
        TriggerOptions {
            once: true,
            ..Default::default()
        },
    );
    // Nothing happened yet.
    assert!(lp.run(&AtomicBool::new(false), &()).unwrap().is_empty());

    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.csv"), "x\n1\n").unwrap();
    let v = repo
        .sync("sensors", "occupancy", &data, &SyncOptions::default())
        .unwrap()
        .version
        .unwrap();
    let fired = lp.run(&AtomicBool::new(false), &()).unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].trigger, "retrain");
    let clone_id = fired[0].task.clone().expect("a clone was launched");
    let clone = repo.task(&clone_id).unwrap();
    assert_eq!(clone.status, TaskStatus::Queued);
    assert_eq!(clone.queue.as_deref(), Some("train"));
    assert_eq!(clone.parent.as_deref(), Some(template.id.as_str()));
    assert_eq!(clone.params["General/dataset_id"], v.id.to_hex());
    // The cursor moved: the same version does not fire again.
    assert!(lp.run(&AtomicBool::new(false), &()).unwrap().is_empty());
}

/// Passes staged paths to the test thread.
struct Staged(Mutex<mpsc::Sender<String>>);

impl WatchEvents for Staged {
    fn staged(&self, path: &str) {
        self.0.lock().unwrap().send(path.to_string()).unwrap();
    }
}

#[test]
fn a_watch_stages_settled_files_and_finalizes_when_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = repo_in(tmp.path());
    let folder = tmp.path().join("incoming");
    std::fs::create_dir_all(folder.join("day1")).unwrap();
    std::fs::write(folder.join("day1/a.csv"), "x\n1\n").unwrap();
    let watcher = Watcher::new(
        &repo,
        WatchOptions {
            project: "sensors".into(),
            name: "occupancy".into(),
            folder: folder.clone(),
            settle: Duration::ZERO,
            dataset_path: "raw".into(),
        },
    )
    .unwrap();
    assert!(!watcher.resumed());
    let stop = watcher.stopper();
    let (tx, rx) = mpsc::channel();
    let out = std::thread::scope(|s| {
        let running = s.spawn(move || watcher.run(&Staged(Mutex::new(tx))));
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), "raw/day1/a.csv");
        // A file arriving while it runs, complete (renamed into place).
        let outside = tmp.path().join("b.csv");
        std::fs::write(&outside, "x\n2\n").unwrap();
        std::fs::rename(&outside, folder.join("b.csv")).unwrap();
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), "raw/b.csv");
        stop.stop(15);
        running.join().unwrap().unwrap()
    });
    assert_eq!(out.signal, 15);
    assert_eq!(out.staged, 2);
    let v = out.version.expect("a version");
    let files: Vec<String> = repo
        .files(&v, None)
        .unwrap()
        .into_iter()
        .map(|f| f.path)
        .collect();
    assert_eq!(files, vec!["raw/b.csv", "raw/day1/a.csv"]);
    assert!(matches!(
        Watcher::new(
            &repo,
            WatchOptions {
                project: "sensors".into(),
                name: "occupancy".into(),
                folder: folder.join("b.csv"),
                settle: Duration::ZERO,
                dataset_path: String::new(),
            },
        ),
        Err(dsv_runtime::Error::NotAFolder { .. })
    ));
}
