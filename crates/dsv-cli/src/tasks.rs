//! `dsv task …`, `dsv agent`, `dsv model …`: experiments, queues, agents,
//! the in-process trainer and external commands.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use dsv::{AgentInfo, Finish, Repo, Task, TaskStatus};

use crate::error::CliError;
use crate::output;
use crate::Ctx;

/// `dsv task`.
#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// A draft task: the built-in trainer (--trainer MODEL) or your command (--command CMD).
    Create(CreateArgs),
    /// A draft copy of a task with parameter overrides.
    Clone(CloneArgs),
    /// Put a draft task on a queue for an agent.
    Enqueue(EnqueueArgs),
    /// Run a task here and now.
    Run(IdArg),
    /// Stop a queued or running task.
    Abort(IdArg),
    /// Everything about a task.
    Show(IdArg),
    /// Tasks, newest first.
    List(ListArgs),
    /// A task's console log.
    Logs(LogsArgs),
}

/// `task create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// PROJECT/NAME.
    name: String,
    /// Built-in trainer with this model: logistic, tree, forest, naive_bayes.
    #[arg(long, conflicts_with = "command", required_unless_present = "command")]
    trainer: Option<String>,
    /// Shell command to run (gets $DSV_DATASET_PATH, $DSV_PARAMS, $DSV_METRICS, $DSV_OUTPUT_DIR).
    #[arg(long)]
    command: Option<String>,
    /// Parameters: SECTION/KEY=VALUE (e.g. General/dataset_id=…, Model/max_depth=3).
    #[arg(long = "set", value_name = "SECTION/KEY=VALUE")]
    set: Vec<String>,
    /// Evaluation gate: when the task completes, promote its model to
    /// `production` if it beats the current one on METRIC (same evaluation data).
    #[arg(long, value_name = "METRIC")]
    promote_if_better: Option<String>,
    /// Improvement required by --promote-if-better.
    #[arg(long, default_value_t = 0.0, requires = "promote_if_better")]
    promote_margin: f64,
    /// METRIC of --promote-if-better is a loss or an error: lower is better.
    #[arg(long, requires = "promote_if_better")]
    lower_is_better: bool,
}

/// `task clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// Task id or prefix.
    id: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// Overrides: SECTION/KEY=VALUE.
    #[arg(long = "set", value_name = "SECTION/KEY=VALUE")]
    set: Vec<String>,
}

/// `task enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Task id or prefix.
    id: String,
    /// Queue.
    #[arg(long, default_value = "default")]
    queue: String,
}

/// A task id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Task id or prefix (4+ hex digits).
    id: String,
}

/// `task list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this project.
    #[arg(long)]
    project: Option<String>,
    /// Only this status.
    #[arg(long)]
    status: Option<String>,
}

/// `task logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Task id or prefix.
    id: String,
    /// Keep printing until the task finishes.
    #[arg(long)]
    follow: bool,
}

/// `dsv agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Queues to serve (oldest task first across them).
    #[arg(long = "queue", default_value = "default")]
    queues: Vec<String>,
    /// Run until the queues are empty, then exit.
    #[arg(long)]
    once: bool,
    /// Agent name (default: agent-HOST-PID).
    #[arg(long)]
    name: Option<String>,
    /// Requeue tasks of dead agents instead of failing them.
    #[arg(long)]
    requeue_dead: bool,
    /// Seconds without a heartbeat after which an agent counts as dead.
    #[arg(long, default_value_t = 30)]
    dead_after: u64,
    /// Also fire triggers (the whole retraining loop in one process).
    #[arg(long)]
    triggers: bool,
}

/// Wakes a loop when the repository's database changes (another process
/// wrote), or after a timeout.
pub struct Wake {
    rx: std::sync::mpsc::Receiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl Wake {
    /// Watches `.dsv/db`.
    pub fn new(repo: &Repo) -> Result<Wake, CliError> {
        use notify::Watcher;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
                let _ = tx.send(());
            })
            .map_err(|e| CliError::repo(format!("cannot watch the repository: {e}")))?;
        let db = repo.store().dir().join("db");
        watcher
            .watch(&db, notify::RecursiveMode::NonRecursive)
            .map_err(|e| CliError::repo(format!("cannot watch {}: {e}", db.display())))?;
        Ok(Wake {
            rx,
            _watcher: watcher,
        })
    }
    /// Blocks until a change or `timeout`; drains queued notifications.
    pub fn wait(&self, timeout: Duration) {
        let _ = self.rx.recv_timeout(timeout);
        self.drain();
    }
    /// Forgets notifications so far.
    pub fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }
}

/// `dsv model`.
#[derive(Debug, Subcommand)]
pub enum ModelCmd {
    /// Models, newest first.
    List(ModelListArgs),
    /// One model: metrics, lineage, features.
    Show(ModelArg),
    /// Add or remove tags.
    Tag(ModelTagArgs),
    /// Apply a model to a CSV file: prediction and probability per row.
    Predict(PredictArgs),
}

/// `model list`.
#[derive(Debug, Args)]
pub struct ModelListArgs {
    /// Only models with this tag.
    #[arg(long)]
    tag: Option<String>,
}

/// A model.
#[derive(Debug, Args)]
pub struct ModelArg {
    /// Id prefix or PROJECT/NAME@TAG.
    model: String,
}

/// `model tag`.
#[derive(Debug, Args)]
pub struct ModelTagArgs {
    /// Id prefix or PROJECT/NAME@TAG.
    model: String,
    /// Tags to add.
    #[arg(long)]
    add: Vec<String>,
    /// Tags to remove.
    #[arg(long)]
    remove: Vec<String>,
}

/// `model predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Id prefix or PROJECT/NAME@TAG.
    model: String,
    /// CSV file with the model's feature columns.
    file: PathBuf,
    /// Write here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

fn open(ctx: &Ctx) -> Result<Repo, CliError> {
    Ok(Repo::from_store(crate::repo::open(ctx)?))
}

fn parse_sets(sets: &[String]) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    for s in sets {
        let (k, v) = s.split_once('=').ok_or_else(|| {
            CliError::user(format!("--set '{s}' is not SECTION/KEY=VALUE"))
                .hint("e.g. --set General/dataset_id=sensors/occupancy --set Model/max_depth=3")
        })?;
        out.insert(k.trim().to_string(), v.to_string());
    }
    Ok(out)
}

fn task_json(t: &Task) -> Value {
    json!({
        "id": t.id,
        "project": t.project,
        "name": t.name,
        "kind": t.kind,
        "command": t.command,
        "status": t.status.as_str(),
        "params": t.params,
        "parent": t.parent,
        "inputs": t.inputs,
        "metrics": t.metrics,
        "scalars": t.scalars,
        "models": t.models,
        "artifacts": t.artifacts,
        "artifact_files": t.artifact_files,
        "queue": t.queue,
        "created": crate::dataset::iso(t.created_ms),
        "started": t.started_ms.map(crate::dataset::iso),
        "created_ms": t.created_ms,
        "queued_ms": t.queued_ms,
        "started_ms": t.started_ms,
        "finished_ms": t.finished_ms,
        "finished": t.finished_ms.map(crate::dataset::iso),
        "agent": t.agent.as_ref().map(|a| json!({"name": a.name, "host": a.host, "pid": a.pid})),
        "error": t.error,
    })
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Runs a task command.
pub fn task(ctx: &Ctx, cmd: TaskCmd) -> Result<(), CliError> {
    let repo = open(ctx)?;
    match cmd {
        TaskCmd::Create(a) => {
            let (project, name) = dsv::rev::parse_dataset_name(&a.name)?;
            let mut params = parse_sets(&a.set)?;
            if let Some(m) = &a.promote_if_better {
                params.insert("Promote/metric".into(), m.clone());
                params.insert("Promote/margin".into(), a.promote_margin.to_string());
                if a.lower_is_better {
                    params.insert("Promote/lower_is_better".into(), "true".into());
                }
            }
            let kind = if let Some(m) = &a.trainer {
                if !dsv_train::MODELS.contains(&m.as_str()) {
                    return Err(CliError::user(format!(
                        "unknown model '{m}' (known: {})",
                        dsv_train::MODELS.join(", ")
                    )));
                }
                params.insert("General/model".into(), m.clone());
                "trainer"
            } else {
                "command"
            };
            let t = repo.create_task(&project, &name, kind, a.command, params)?;
            if ctx.json {
                return output::json(&task_json(&t));
            }
            println!("{}", t.id);
            Ok(())
        }
        TaskCmd::Clone(a) => {
            let t = repo.clone_task(&a.id, a.name.as_deref(), &parse_sets(&a.set)?)?;
            if ctx.json {
                return output::json(&task_json(&t));
            }
            println!("{}", t.id);
            Ok(())
        }
        TaskCmd::Enqueue(a) => {
            let t = repo.enqueue(&a.id, &a.queue)?;
            if ctx.json {
                return output::json(&task_json(&t));
            }
            println!("{} queued on '{}'", short(&t.id), a.queue);
            Ok(())
        }
        TaskCmd::Run(a) => {
            let agent = agent_info(None);
            let t = repo.start_task(&a.id, &agent)?;
            let stop = Arc::new(AtomicBool::new(false));
            let done = execute(&repo, &t, &stop)?;
            report_done(ctx, &done)?;
            if done.status == TaskStatus::Completed {
                Ok(())
            } else {
                Err(CliError::user(format!(
                    "task {} {}: {}",
                    short(&done.id),
                    done.status.as_str(),
                    done.error.clone().unwrap_or_default()
                )))
            }
        }
        TaskCmd::Abort(a) => {
            let t = repo.abort_task(&a.id)?;
            if ctx.json {
                return output::json(&task_json(&t));
            }
            if t.status == TaskStatus::Running {
                println!("{}: abort requested; its agent stops it", short(&t.id));
            } else {
                println!("{}: aborted", short(&t.id));
            }
            Ok(())
        }
        TaskCmd::Show(a) => {
            let t = repo.task(&a.id)?;
            if ctx.json {
                return output::json(&task_json(&t));
            }
            println!("task      {}", t.id);
            println!("name      {}/{}  ({})", t.project, t.name, t.kind);
            println!("status    {}", t.status.as_str());
            if let Some(c) = &t.command {
                println!("command   {c}");
            }
            if let Some(p) = &t.parent {
                println!("parent    {p}");
            }
            for (k, v) in &t.params {
                println!("param     {k} = {v}");
            }
            for i in &t.inputs {
                println!("input     {i}");
            }
            for (k, v) in &t.metrics {
                println!("metric    {k} = {}", fmt_value(*v));
            }
            for (k, pts) in &t.scalars {
                if let (Some(first), Some(last)) = (pts.first(), pts.last()) {
                    println!(
                        "scalar    {k}: {} points, {} (step {}) -> {} (step {})",
                        pts.len(),
                        fmt_value(first.1),
                        first.0,
                        fmt_value(last.1),
                        last.0
                    );
                }
            }
            for m in &t.models {
                println!("model     {m}");
            }
            if let Some(a) = &t.artifacts {
                println!("artifacts {a} ({})", t.artifact_files.join(", "));
            }
            if let Some(e) = &t.error {
                println!("error     {e}");
            }
            Ok(())
        }
        TaskCmd::List(a) => {
            let status = a.status.as_deref().map(TaskStatus::parse).transpose()?;
            let ts = repo.tasks(a.project.as_deref(), status)?;
            if ctx.json {
                return output::json(&Value::Array(
                    ts.iter()
                        .map(|t| {
                            json!({"id": t.id, "project": t.project, "name": t.name,
                                   "status": t.status.as_str(), "parent": t.parent,
                                   "metrics": t.metrics, "created": crate::dataset::iso(t.created_ms)})
                        })
                        .collect(),
                ));
            }
            for t in &ts {
                println!(
                    "{}  {:<10} {:<30} {}",
                    short(&t.id),
                    t.status.as_str(),
                    format!("{}/{}", t.project, t.name),
                    t.metrics
                        .get("test/accuracy")
                        .map(|a| format!("test/accuracy {a:.4}"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        TaskCmd::Logs(a) if ctx.json => {
            // One document: the whole log once the task is final (with
            // --follow) or as it is now.
            loop {
                let t = repo.task(&a.id)?;
                if !a.follow || t.status.is_final() {
                    let log = repo.task_log(&a.id)?;
                    return output::json(
                        &json!({"id": t.id, "status": t.status.as_str(), "log": log}),
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
                repo.store().refresh()?;
            }
        }
        TaskCmd::Logs(a) => {
            let mut shown = 0;
            loop {
                let log = repo.task_log(&a.id)?;
                print!("{}", &log[shown.min(log.len())..]);
                std::io::stdout().flush()?;
                shown = log.len();
                if !a.follow || repo.task(&a.id)?.status.is_final() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
                repo.store().refresh()?;
            }
            Ok(())
        }
    }
}

fn report_done(ctx: &Ctx, t: &Task) -> Result<(), CliError> {
    if ctx.json {
        return output::json(&task_json(t));
    }
    println!(
        "{} {} {}/{}{}",
        short(&t.id),
        t.status.as_str(),
        t.project,
        t.name,
        t.metrics
            .get("test/accuracy")
            .map(|a| format!(": test/accuracy {a:.4}"))
            .unwrap_or_default()
    );
    if let Some(e) = &t.error {
        println!("  {e}");
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn agent_info(name: Option<String>) -> AgentInfo {
    let host = hostname();
    let pid = std::process::id();
    let name = name.unwrap_or_else(|| format!("agent-{host}-{pid}"));
    AgentInfo::new(name, host, pid)
}

/// Whether an agent process lives (only knowable on this host).
fn agent_alive(a: &AgentInfo) -> Option<bool> {
    if a.host != hostname() {
        return None;
    }
    match std::fs::read_to_string(format!("/proc/{}/stat", a.pid)) {
        // A zombie has exited; a pid now used by another program (not a
        // `dsv`) was reused after the agent died.
        Ok(s) => Some(
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(true)
                && std::fs::read_to_string(format!("/proc/{}/comm", a.pid))
                    .map(|c| c.trim() == "dsv")
                    .unwrap_or(true),
        ),
        Err(_) => Some(false),
    }
}

/// The running task's log: buffered, flushed by the heartbeat.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<String>>);

impl LogBuf {
    fn line(&self, s: &str) {
        if let Ok(mut b) = self.0.lock() {
            b.push_str(s);
            if !s.ends_with('\n') {
                b.push('\n');
            }
        }
    }
    fn take(&self) -> String {
        self.0
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
}

/// Runs a started task to its end and records the outcome.
fn execute(repo: &Repo, t: &Task, stop: &Arc<AtomicBool>) -> Result<Task, CliError> {
    let log = LogBuf::default();
    let abort = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    log.line(&format!(
        "dsv: running {}/{} ({}) as {}",
        t.project,
        t.name,
        t.kind,
        t.agent.as_ref().map(|a| a.name.as_str()).unwrap_or("?")
    ));
    // Heartbeat: a sign of life, the log so far, and abort requests.
    let hb = {
        let dir = repo.store().dir().to_path_buf();
        let id = t.id.clone();
        let run = t.started_ms;
        let log = log.clone();
        let abort = abort.clone();
        let finished = finished.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let Ok(store) = dsv_store::Store::open(&dir, Default::default()) else {
                return;
            };
            let repo = Repo::from_store(store);
            let mut ticks = 0u32;
            while !finished.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                ticks += 1;
                if stop.load(Ordering::Acquire) {
                    abort.store(true, Ordering::Release);
                }
                if ticks % 20 == 0 {
                    if let Ok(true) = repo.heartbeat_run(&id, run, &log.take()) {
                        abort.store(true, Ordering::Release);
                    }
                }
            }
        })
    };
    // A panic in a model library must fail the task, not kill the agent
    // with the task left running.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match t.kind.as_str() {
        "trainer" => run_trainer(repo, t, &log, &abort),
        _ => run_command(repo, t, &log, &abort),
    }));
    let mut finish = run.unwrap_or_else(|p| Finish {
        status: Some(TaskStatus::Failed),
        error: Some(format!(
            "the trainer crashed: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into())
        )),
        ..Default::default()
    });
    finished.store(true, Ordering::Release);
    let _ = hb.join();
    if finish.status == Some(TaskStatus::Aborted) {
        finish.error.get_or_insert_with(|| {
            if stop.load(Ordering::Acquire) {
                "the agent was stopped (SIGTERM/SIGINT)".into()
            } else {
                "aborted on request".into()
            }
        });
    }
    if let Some(e) = &finish.error {
        log.line(&format!("dsv: {e}"));
    }
    log.line(&format!(
        "dsv: {}",
        finish.status.map(|s| s.as_str()).unwrap_or("completed")
    ));
    finish.log = log.take();
    finish.run_started_ms = t.started_ms;
    // The outcome must not be lost to a busy repository (a long gc holding
    // the write lock past the lock timeout): try again a few times.
    let mut attempt = 0;
    let done = loop {
        match repo.finish_task(&t.id, finish.clone()) {
            Err(e) if transient(&e) && attempt < 5 => {
                attempt += 1;
                eprintln!("{}: recording the result: {e}; retrying", short(&t.id));
            }
            // Given up on and started again elsewhere: not this agent's to
            // record; it goes on with other work.
            Err(dsv::Error::Conflict(why)) => {
                eprintln!("{}: {why}", short(&t.id));
                return Ok(repo.task(&t.id)?);
            }
            r => break r?,
        }
    };
    // The evaluation gate of --promote-if-better.
    if let (Some(metric), Some(model), TaskStatus::Completed) = (
        done.params.get("Promote/metric"),
        done.models.first(),
        done.status,
    ) {
        let margin = done
            .params
            .get("Promote/margin")
            .and_then(|m| m.parse().ok())
            .unwrap_or(0.0);
        let eval = crate::triggers::evaluator(repo);
        let lower = done
            .params
            .get("Promote/lower_is_better")
            .is_some_and(|v| v == "true");
        let d = repo.promotion_decision(model, metric, margin, lower, &eval)?;
        repo.apply_promotion(&d)?;
        eprintln!("{}: {}", short(&done.id), d.2);
    }
    Ok(done)
}

/// A metric for people: counts as integers, the rest with four decimals.
fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

fn run_trainer(repo: &Repo, t: &Task, log: &LogBuf, abort: &AtomicBool) -> Finish {
    let mut lines = |s: &str| log.line(s);
    let cancelled = || abort.load(Ordering::Acquire);
    match dsv_train::train_until(repo, &t.params, &mut lines, &cancelled) {
        Ok(out) => {
            let mut scalars: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
            for (n, step, v) in &out.scalars {
                scalars.entry(n.clone()).or_default().push((*step, *v));
            }
            let body = serde_json::to_vec(&out.model).unwrap_or_default();
            let mut metrics = out.metrics.clone();
            if let [n, p] = out.confusion.as_slice() {
                metrics.insert("test/tn".into(), n[0] as f64);
                metrics.insert("test/fp".into(), n[1] as f64);
                metrics.insert("test/fn".into(), p[0] as f64);
                metrics.insert("test/tp".into(), p[1] as f64);
            }
            Finish {
                status: Some(TaskStatus::Completed),
                metrics,
                scalars,
                inputs: out.inputs.iter().map(|v| v.id.to_hex()).collect(),
                model: Some((out.model.kind.clone(), body)),
                ..Default::default()
            }
        }
        Err(e @ dsv_train::Error::Cancelled(_)) => {
            log.line(&format!("dsv: {e}"));
            Finish {
                status: Some(TaskStatus::Aborted),
                ..Default::default()
            }
        }
        Err(e) => Finish {
            status: Some(TaskStatus::Failed),
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

fn env_key(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn run_command(repo: &Repo, t: &Task, log: &LogBuf, abort: &Arc<AtomicBool>) -> Finish {
    let fail = |e: String| Finish {
        status: Some(TaskStatus::Failed),
        error: Some(e),
        ..Default::default()
    };
    let work = match tempfile::Builder::new().prefix("dsv-task-").tempdir() {
        Ok(w) => w,
        Err(e) => return fail(format!("cannot make a work folder: {e}")),
    };
    let mut inputs = Vec::new();
    let mut dataset_path = None;
    let mut entry_name = None;
    let mut _pin = None;
    if let Some(ds) = t
        .params
        .get("General/dataset_id")
        .filter(|s| !s.trim().is_empty())
    {
        let v = match repo.resolve(ds.trim()) {
            Ok(v) => v,
            Err(e) => return fail(format!("General/dataset_id: {e}")),
        };
        match repo.get_local(
            &v,
            &dsv::GetLocalOptions {
                pin: true,
                ..Default::default()
            },
        ) {
            Ok(c) => {
                log.line(&format!(
                    "dsv: {} materialized read-only at {}",
                    v.label(),
                    c.path.display()
                ));
                for d in &c.repaired {
                    log.line(&format!(
                        "dsv: the cached copy had been changed ({}: {}); it was rebuilt",
                        d.path, d.detail
                    ));
                }
                dataset_path = Some(c.path.clone());
                entry_name = Some(c.name.clone());
                _pin = c.pin;
            }
            Err(e) => return fail(format!("cannot materialize {}: {e}", v.label())),
        }
        inputs.push(v.id.to_hex());
    }
    let params_file = work.path().join("params.json");
    let metrics_file = work.path().join("metrics.jsonl");
    let out_dir = work.path().join("output");
    if let Err(e) = std::fs::write(
        &params_file,
        serde_json::to_vec_pretty(&t.params).unwrap_or_default(),
    )
    .and_then(|_| std::fs::write(&metrics_file, b""))
    .and_then(|_| std::fs::create_dir(&out_dir))
    {
        return fail(format!("cannot prepare {}: {e}", work.path().display()));
    }
    let make_cmd = || {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(t.command.clone().unwrap_or_default())
            .env("DSV_TASK_ID", &t.id)
            .env("DSV_PARAMS", &params_file)
            .env("DSV_METRICS", &metrics_file)
            .env("DSV_OUTPUT_DIR", &out_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(p) = &dataset_path {
            cmd.env("DSV_DATASET_PATH", p);
        }
        for (k, v) in &t.params {
            cmd.env(format!("DSV_PARAM_{}", env_key(k)), v);
        }
        cmd
    };
    // The dataset is seen through a read-only view of the cache, even by
    // root (crate::view); where the kernel refuses namespaces the command
    // runs without it and the copy is checked afterwards.
    let mut viewed = dataset_path.is_some();
    let spawned = if viewed {
        let mut cmd = make_cmd();
        crate::view::read_only(&mut cmd, repo.cache().dir());
        cmd.spawn().or_else(|e| {
            log.line(&format!(
                "dsv: no read-only view of the dataset ({e}); the task runs on the cached copy \
                 as is, and dsv checks the copy when the task ends"
            ));
            viewed = false;
            make_cmd().spawn()
        })
    } else {
        make_cmd().spawn()
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the command: {e}")),
    };
    let pipes: Vec<std::thread::JoinHandle<()>> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                log.line(&line);
            }
        })
    })
    .collect();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        if abort.load(Ordering::Acquire) {
            let _ = child.kill();
            break child.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for p in pipes {
        let _ = p.join();
    }
    if let (false, Some(name)) = (viewed, &entry_name) {
        // Without the read-only view, tell what the command changed (the
        // next `get` rebuilds it).
        match repo.check_local(name) {
            Ok(d) if d.is_empty() => {}
            Ok(d) => {
                for x in d {
                    log.line(&format!(
                        "dsv: the command changed its dataset copy ({}: {}); it is rebuilt before its next use",
                        x.path, x.detail
                    ));
                }
            }
            Err(e) => log.line(&format!("dsv: cannot check the dataset copy: {e}")),
        }
    }
    // Metrics: JSON lines {"name": …, "value": …, "step": …}.
    let mut metrics = BTreeMap::new();
    let mut scalars: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(&metrics_file) {
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<Value>(l) {
                Ok(v) => match (v["name"].as_str(), v["value"].as_f64()) {
                    (Some(n), Some(x)) => {
                        if let Some(s) = v["step"].as_u64() {
                            scalars.entry(n.to_string()).or_default().push((s, x));
                        }
                        metrics.insert(n.to_string(), x);
                    }
                    _ => log.line(&format!(
                        "dsv: $DSV_METRICS line {}: needs \"name\" and a numeric \"value\"",
                        i + 1
                    )),
                },
                Err(e) => log.line(&format!(
                    "dsv: $DSV_METRICS line {} is not JSON: {e}",
                    i + 1
                )),
            }
        }
    }
    // Artifacts: the output folder, stored as a version of artifacts/<task id>.
    let mut artifacts = None;
    let files: Vec<String> = std::fs::read_dir(&out_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !files.is_empty() {
        match repo.sync("artifacts", &t.id, &out_dir, &Default::default()) {
            Ok(o) => {
                if let Some(v) = o.version {
                    artifacts = Some((v.id.to_hex(), files));
                }
            }
            Err(e) => log.line(&format!("dsv: cannot store the output files: {e}")),
        }
    }
    let (st, error) = match status {
        _ if abort.load(Ordering::Acquire) => (TaskStatus::Aborted, None),
        Ok(s) if s.success() => (TaskStatus::Completed, None),
        Ok(s) => (
            TaskStatus::Failed,
            Some(match s.code() {
                Some(c) => format!("the command exited with code {c}"),
                None => "the command was killed by a signal".to_string(),
            }),
        ),
        Err(e) => (
            TaskStatus::Failed,
            Some(format!("waiting for the command: {e}")),
        ),
    };
    Finish {
        status: Some(st),
        error,
        metrics,
        scalars,
        inputs,
        artifacts,
        ..Default::default()
    }
}

/// `dsv agent`: runs queued tasks until interrupted (or, with --once, until
/// the queues are empty).
/// A failure that waiting cures: the write lock stayed busy past its
/// timeout, or a gc ran between reading and writing.
fn transient(e: &dsv::Error) -> bool {
    matches!(
        e,
        dsv::Error::Store(dsv_store::Error::LockTimeout { .. } | dsv_store::Error::ConcurrentGc(_))
    )
}

pub fn agent(ctx: &Ctx, a: AgentArgs) -> Result<(), CliError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let repo = open(ctx)?;
    let me = agent_info(a.name.clone());
    let stop = Arc::new(AtomicBool::new(false));
    for s in [SIGINT, SIGTERM] {
        signal_hook::flag::register(s, stop.clone())
            .map_err(|e| CliError::repo(format!("cannot install signal handlers: {e}")))?;
    }
    // Wake on any change of the database (an enqueue by another process).
    let wake = Wake::new(&repo)?;
    if !ctx.json {
        eprintln!("{} serving {:?}", me.name, a.queues);
    }
    let mut ran = Vec::new();
    loop {
        // A long-running agent outlives a busy repository (a lock timeout
        // while a gc runs) instead of exiting: it waits and tries again.
        let housekeeping = (|| -> Result<(), dsv::Error> {
            repo.store().refresh()?;
            let reaped =
                repo.reap_dead_tasks(&agent_alive, (a.dead_after * 1000) as i64, a.requeue_dead)?;
            for t in reaped {
                if !ctx.json {
                    eprintln!("{}: {}", short(&t.id), t.error.clone().unwrap_or_default());
                }
            }
            Ok(())
        })();
        match housekeeping {
            Err(e) if transient(&e) && !a.once => {
                eprintln!("{}: {e}; trying again", me.name);
                wake.wait(Duration::from_secs(1));
                continue;
            }
            r => r?,
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        if a.triggers {
            crate::triggers::process(ctx, &repo)?;
        }
        let next = match repo.dequeue(&a.queues, &me) {
            Err(e) if transient(&e) && !a.once => {
                eprintln!("{}: {e}; trying again", me.name);
                wake.wait(Duration::from_secs(1));
                continue;
            }
            r => r?,
        };
        match next {
            Some(t) => {
                let done = execute(&repo, &t, &stop)?;
                if !ctx.json {
                    report_done(ctx, &done)?;
                }
                ran.push(done.id);
                wake.drain();
                continue;
            }
            None if a.once => break,
            None => {
                // Block until the database changes (or a second passes, for
                // heartbeats of dead agents and signals).
                wake.wait(Duration::from_secs(1));
            }
        }
    }
    if ctx.json {
        output::json(&json!({"agent": me.name, "ran": ran}))?;
    }
    Ok(())
}

/// Runs a model command.
pub fn model(ctx: &Ctx, cmd: ModelCmd) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let mj = |m: &dsv::Model| {
        json!({"id": m.id, "project": m.project, "name": m.name, "kind": m.kind, "task": m.task,
               "datasets": m.datasets, "metrics": m.metrics, "tags": m.tags,
               "created": crate::dataset::iso(m.created_ms)})
    };
    match cmd {
        ModelCmd::List(a) => {
            let ms = repo.models(a.tag.as_deref())?;
            if ctx.json {
                return output::json(&Value::Array(ms.iter().map(mj).collect()));
            }
            for m in &ms {
                println!(
                    "{}  {:<12} {:<30} {:<10} [{}]",
                    short(&m.id),
                    m.kind,
                    format!("{}/{}", m.project, m.name),
                    m.metrics
                        .get("test/accuracy")
                        .map(|a| format!("{a:.4}"))
                        .unwrap_or_default(),
                    m.tags.join(", ")
                );
            }
            Ok(())
        }
        ModelCmd::Show(a) => {
            let m = repo.model(&a.model)?;
            let body: dsv_train::FittedModel = serde_json::from_slice(&repo.model_body(&m)?)
                .map_err(|e| CliError::repo(format!("model {} does not decode: {e}", m.id)))?;
            let mut v = mj(&m);
            v["features"] = json!(body.features);
            v["label"] = json!(body.label);
            v["classes"] = json!(body.classes);
            v["hyperparameters"] = json!(body.hyper);
            // Lineage: each dataset version, live, deleted but kept, or
            // missing (deleted by a build that kept nothing) — never silent.
            v["lineage"] = Value::Array(
                m.datasets
                    .iter()
                    .map(|d| match repo.resolve(d) {
                        Ok(x) if x.deleted => json!({"id": d, "version": x.label(),
                            "state": "deleted from its dataset (data kept for this model)"}),
                        Ok(x) => json!({"id": d, "version": x.label(), "state": "live"}),
                        Err(e) => json!({"id": d, "version": null,
                            "state": format!("missing: {e}")}),
                    })
                    .collect(),
            );
            if ctx.json {
                return output::json(&v);
            }
            println!("model       {}", m.id);
            println!("name        {}/{}  ({})", m.project, m.name, m.kind);
            println!("task        {}", m.task);
            println!("created     {}", crate::dataset::iso(m.created_ms));
            println!("tags        {}", m.tags.join(", "));
            for d in &m.datasets {
                println!("dataset     {d}");
            }
            println!("label       {}", body.label);
            println!(
                "classes     {}",
                body.classes
                    .iter()
                    .map(|c| fmt_value(*c))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("features    {}", body.features.join(", "));
            for (k, val) in &body.hyper {
                println!("hyper       {k} = {val}");
            }
            for (k, val) in &m.metrics {
                println!("metric      {k} = {}", fmt_value(*val));
            }
            Ok(())
        }
        ModelCmd::Tag(a) => {
            let m = repo.tag_model(&a.model, &a.add, &a.remove)?;
            if ctx.json {
                return output::json(&json!({"id": m.id, "tags": m.tags}));
            }
            println!("{}: [{}]", short(&m.id), m.tags.join(", "));
            Ok(())
        }
        ModelCmd::Predict(a) => {
            let m = repo.model(&a.model)?;
            let body: dsv_train::FittedModel = serde_json::from_slice(&repo.model_body(&m)?)
                .map_err(|e| CliError::repo(format!("model {} does not decode: {e}", m.id)))?;
            let f = std::fs::File::open(&a.file)
                .map_err(|e| CliError::user(format!("cannot open {}: {e}", a.file.display())))?;
            let name = a.file.display().to_string();
            let preds = dsv_train::predict(&body, &name, std::io::BufReader::new(f))
                .map_err(|e| CliError::user(e.to_string()))?;
            if ctx.json && a.output.is_none() {
                let rows: Vec<Value> = preds
                    .iter()
                    .enumerate()
                    .map(|(i, (label, p))| json!({"row": i + 1, "label": label, "probability": p}))
                    .collect();
                return output::json(&json!({
                    "model": m.id, "label": body.label, "rows": preds.len(), "predictions": rows,
                }));
            }
            let mut out: Box<dyn Write> = match &a.output {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(
                    |e| CliError::user(format!("cannot create {}: {e}", p.display())),
                )?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            writeln!(out, "row,{},probability", body.label)?;
            for (i, (label, p)) in preds.iter().enumerate() {
                writeln!(out, "{},{},{:.6}", i + 1, label, p)?;
            }
            out.flush()?;
            if ctx.json {
                return output::json(&json!({
                    "model": m.id, "label": body.label, "rows": preds.len(), "output": a.output,
                }));
            }
            Ok(())
        }
    }
}
