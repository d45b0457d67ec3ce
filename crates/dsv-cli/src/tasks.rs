//! `dsv task …`, `dsv agent`, `dsv model …`: arguments and rendering. The
//! agent loop, task execution and the executors are `dsv_runtime`'s.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use dsv::{AgentInfo, Repo, Task, TaskStatus};
use dsv_runtime::{Agent, AgentEvents, AgentOptions, Executors};

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
    /// Fail (or requeue) running tasks whose lease expired: their agent
    /// died or lost the repository. Agents do this on their own too.
    Reap(ReapArgs),
}

/// `task reap`.
#[derive(Debug, Args)]
pub struct ReapArgs {
    /// Put them back on their queue instead of failing them.
    #[arg(long)]
    requeue: bool,
    /// Seconds without a heartbeat after which a task recorded before
    /// leases existed (an older dsv) counts as orphaned.
    #[arg(long, default_value_t = 30)]
    dead_after: u64,
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
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    /// `dsv agent list`: every agent of the repository.
    #[command(subcommand)]
    cmd: Option<AgentSub>,
    /// Queues to serve (oldest task first across them).
    #[arg(long = "queue", default_value = "default")]
    queues: Vec<String>,
    /// Run until the queues are empty, then exit.
    #[arg(long)]
    once: bool,
    /// Agent name (default: agent-HOST-PID).
    #[arg(long)]
    name: Option<String>,
    /// Requeue tasks whose lease expired (their agent died or lost the
    /// repository) instead of failing them.
    #[arg(long)]
    requeue_dead: bool,
    /// Seconds a task's lease lasts without renewal (the agent renews it
    /// every third of it): a task whose lease ran out is reaped by any
    /// agent or `dsv task reap`.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_ttl: u64,
    /// Seconds without a heartbeat after which a task recorded before
    /// leases existed (an older dsv) counts as orphaned.
    #[arg(long, default_value_t = 30)]
    dead_after: u64,
    /// Also fire triggers (the whole retraining loop in one process).
    #[arg(long)]
    triggers: bool,
}

/// `dsv agent …`.
#[derive(Debug, Subcommand)]
pub enum AgentSub {
    /// Every agent (on any machine): host, queues, state, current task,
    /// last heartbeat; agents silent for too long are shown as lost.
    List,
}

/// `dsv agent list`.
fn agent_list(ctx: &Ctx) -> Result<(), CliError> {
    let repo = open(ctx)?;
    let now = repo.store().now_ms();
    let rows: Vec<(dsv::agents::AgentPresence, String, i64)> = repo
        .agent_statuses(now)?
        .into_iter()
        .map(|a| {
            let state = if a.lost {
                "lost".to_string()
            } else {
                serde_json::to_value(a.presence.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            };
            (a.presence, state, a.heard_ms)
        })
        .collect();
    if ctx.json {
        return output::json(&Value::Array(
            rows.iter()
                .map(|(p, state, heard)| {
                    json!({"name": p.agent.name, "id": p.agent.id, "host": p.agent.host,
                       "pid": p.agent.pid, "queues": p.queues, "triggers": p.triggers,
                       "state": state, "task": p.task,
                       "started": crate::dataset::iso(p.started_ms),
                       "last_heartbeat": crate::dataset::iso(*heard),
                       "seconds_since_heartbeat": (now - heard) as f64 / 1000.0})
                })
                .collect(),
        ));
    }
    if rows.is_empty() {
        println!("no agents");
        return Ok(());
    }
    println!(
        "{:<28} {:<16} {:<8} {:<20} {:<14} last heartbeat",
        "name", "host", "state", "queues", "task"
    );
    for (p, state, heard) in &rows {
        let mut queues = p.queues.join(",");
        if p.triggers {
            queues.push_str(" +triggers");
        }
        println!(
            "{:<28} {:<16} {:<8} {:<20} {:<14} {:.1}s ago",
            p.agent.name,
            p.agent.host,
            state,
            queues,
            p.task.as_deref().map(short).unwrap_or("-"),
            (now - heard) as f64 / 1000.0
        );
    }
    Ok(())
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
    /// A model line's events, newest first: models stored, tags moved,
    /// promotions and canary decisions with their reasons.
    History(ModelHistoryArgs),
}

/// `model history`.
#[derive(Debug, Args)]
pub struct ModelHistoryArgs {
    /// The line, PROJECT/NAME.
    line: String,
    /// At most this many events.
    #[arg(long, short = 'n', default_value_t = 50)]
    limit: usize,
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
    crate::repo::open_repo(ctx)
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
        "heartbeat_ms": t.heartbeat_ms,
        "lease": t.lease.as_ref().map(|l| json!({
            "renewed_ms": l.renewed_ms,
            "expires_ms": l.expires_ms,
            "ttl_ms": l.ttl_ms,
        })),
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
            let done = dsv_runtime::run_task(
                &repo,
                &Executors::default(),
                &a.id,
                &dsv_runtime::agent_info(None)?,
                &AtomicBool::new(false),
                &AgentOutput {
                    json: ctx.json,
                    flush: None,
                },
            )?;
            report_done(ctx.json, &done)?;
            crate::remote_cmds::flush_objects(ctx, &repo)?;
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
        TaskCmd::Reap(a) => {
            let reaped = dsv_runtime::reap(&repo, a.requeue, Duration::from_secs(a.dead_after))?;
            if ctx.json {
                return output::json(&json!({
                    "reaped": reaped.iter().map(task_json).collect::<Vec<_>>()
                }));
            }
            if reaped.is_empty() {
                println!("no task with an expired lease");
            }
            for t in &reaped {
                println!(
                    "{}: {} ({})",
                    short(&t.id),
                    t.status.as_str(),
                    t.error.as_deref().unwrap_or("")
                );
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

fn report_done(json: bool, t: &Task) -> Result<(), CliError> {
    if json {
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

/// A metric for people: counts as integers, the rest with four decimals.
fn fmt_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// How `dsv agent` and `dsv task run` show what an agent does: on stderr,
/// quiet where `--json` prints one document at the end.
struct AgentOutput<'a> {
    json: bool,
    /// `init --objects` repositories: each task's outputs are sent to the
    /// object store when it ends.
    flush: Option<(&'a Ctx, &'a dsv::Repo)>,
}

impl AgentEvents for AgentOutput<'_> {
    fn serving(&self, me: &AgentInfo, queues: &[String]) {
        if !self.json {
            eprintln!("{} serving {:?}", me.name, queues);
        }
    }
    fn reaped(&self, t: &Task) {
        if !self.json {
            eprintln!("{}: {}", short(&t.id), t.error.clone().unwrap_or_default());
        }
    }
    fn retrying(&self, me: &AgentInfo, e: &dsv::Error) {
        eprintln!("{}: {e}; trying again", me.name);
    }
    fn fired(&self, f: &dsv::Firing) {
        if !self.json {
            crate::triggers::print_firing(f);
        }
    }
    fn result_retry(&self, t: &Task, e: &dsv::Error) {
        eprintln!("{}: recording the result: {e}; retrying", short(&t.id));
    }
    fn result_refused(&self, t: &Task, why: &str) {
        eprintln!("{}: {why}", short(&t.id));
    }
    fn promotion(&self, t: &Task, note: &str) {
        eprintln!("{}: {note}", short(&t.id));
    }
    fn task_finished(&self, t: &Task) {
        if !self.json {
            let _ = report_done(false, t);
        }
        if let Some((ctx, repo)) = self.flush {
            // A failure leaves the outputs here; the next flush sends them.
            if let Err(e) = crate::remote_cmds::flush_objects(ctx, repo) {
                eprintln!("{}: {}", short(&t.id), e.message);
            }
        }
    }
}

/// `dsv agent`: runs queued tasks until interrupted (or, with --once, until
/// the queues are empty). The loop is [`dsv_runtime::Agent`]; SIGINT and
/// SIGTERM set its stop flag.
pub fn agent(ctx: &Ctx, a: AgentArgs) -> Result<(), CliError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if let Some(AgentSub::List) = a.cmd {
        return agent_list(ctx);
    }
    let repo = Arc::new(open(ctx)?);
    let flush_repo = repo.clone();
    let stop = Arc::new(AtomicBool::new(false));
    for s in [SIGINT, SIGTERM] {
        signal_hook::flag::register(s, stop.clone())
            .map_err(|e| CliError::repo(format!("cannot install signal handlers: {e}")))?;
    }
    let agent = Agent::new(
        repo,
        AgentOptions {
            name: a.name,
            queues: a.queues,
            once: a.once,
            dead_after: Duration::from_secs(a.dead_after),
            lease_ttl: Duration::from_secs(a.lease_ttl),
            requeue_dead: a.requeue_dead,
            triggers: a.triggers,
            ..Default::default()
        },
    )?;
    let report = agent.run(
        &stop,
        &AgentOutput {
            json: ctx.json,
            flush: Some((ctx, &flush_repo)),
        },
    )?;
    if ctx.json {
        output::json(&json!({"agent": report.agent.name, "ran": report.ran}))?;
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
        ModelCmd::History(a) => {
            let (project, name) = dsv::rev::parse_dataset_name(&a.line)?;
            let evs = repo.model_history(&project, &name, a.limit)?;
            if ctx.json {
                return output::json(&serde_json::to_value(&evs).unwrap_or_default());
            }
            if evs.is_empty() {
                println!("no model events for {}", a.line);
            }
            for e in &evs {
                let model = e
                    .extra
                    .get("model")
                    .and_then(|v| v.as_str())
                    .map(|s| short(s).to_string())
                    .unwrap_or_default();
                let what = match e.kind {
                    dsv::EventKind::ModelCreated => "created".to_string(),
                    _ => {
                        let mut w = Vec::new();
                        for t in &e.tags_added {
                            w.push(format!("+{t}"));
                        }
                        for t in &e.tags_removed {
                            w.push(format!("-{t}"));
                        }
                        w.join(" ")
                    }
                };
                let reason = e
                    .extra
                    .get("reason")
                    .and_then(|v| v.as_str())
                    .map(|r| {
                        let d = e
                            .extra
                            .get("decision")
                            .and_then(|v| v.as_str())
                            .unwrap_or("");
                        format!("  {d}: {r}")
                    })
                    .unwrap_or_default();
                println!(
                    "{:>6}  {}  {model:<12} {what}{reason}",
                    e.seq,
                    crate::dataset::iso(e.time_ms)
                );
            }
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
