//! `dsv trigger …`: rules over the event log that launch tasks or promote
//! models — arguments and rendering; the loop is `dsv_runtime::TriggerLoop`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use dsv::{Action, Repo, Trigger};
use dsv_runtime::{TriggerEvents, TriggerLoop, TriggerOptions};

use crate::error::CliError;
use crate::output;
use crate::Ctx;

/// `dsv trigger`.
#[derive(Debug, Subcommand)]
pub enum TriggerCmd {
    /// Add a trigger.
    #[command(subcommand)]
    Add(Box<AddCmd>),
    /// Every trigger.
    List,
    /// Remove a trigger (its history stays).
    Remove(NameArg),
    /// A trigger's firings.
    History(NameArg),
    /// Process events until interrupted (--once: what is pending, then exit).
    Run(RunArgs),
}

/// `trigger add`.
#[derive(Debug, Subcommand)]
pub enum AddCmd {
    /// On dataset versions (finalized, or tagged with --on tagged).
    Dataset(DatasetTrig),
    /// On task status changes, optionally with a metric threshold.
    Task(TaskTrig),
    /// On model tags being added.
    Model(ModelTrig),
}

/// Clone action flags.
#[derive(Debug, Args)]
pub struct CloneFlags {
    /// Task to clone and enqueue when the trigger fires.
    #[arg(long, value_name = "TASK")]
    clone: Option<String>,
    /// Overrides of the clone; values may use ${dataset.id}, ${dataset.version},
    /// ${dataset.project}, ${dataset.name}, ${task.id}, ${model.id}.
    #[arg(long = "set", value_name = "SECTION/KEY=VALUE")]
    set: Vec<String>,
    /// Queue of the clone.
    #[arg(long, default_value = "default")]
    queue: String,
    /// Defer while the previous launch is queued or running.
    #[arg(long)]
    single_instance: bool,
}

/// `trigger add dataset`.
#[derive(Debug, Args)]
pub struct DatasetTrig {
    /// Trigger name.
    name: String,
    /// Project (datasets created later included).
    #[arg(long)]
    project: String,
    /// Dataset name (glob).
    #[arg(long)]
    dataset: Option<String>,
    /// Required tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Events: finalized (default), tagged.
    #[arg(long = "on")]
    events: Vec<String>,
    #[command(flatten)]
    action: CloneFlags,
}

/// `trigger add task`.
#[derive(Debug, Args)]
pub struct TaskTrig {
    /// Trigger name.
    name: String,
    /// Project.
    #[arg(long)]
    project: String,
    /// Statuses (default completed).
    #[arg(long = "status")]
    statuses: Vec<String>,
    /// Metric for the threshold.
    #[arg(long, requires = "bound")]
    metric: Option<String>,
    /// Fire when the metric is above this.
    #[arg(long, group = "bound", requires = "metric")]
    above: Option<f64>,
    /// Fire when the metric is below this.
    #[arg(long, group = "bound", requires = "metric")]
    below: Option<f64>,
    /// Promote the task's model when it beats production on METRIC
    /// (default test/accuracy), instead of --clone.
    #[arg(long, value_name = "METRIC", conflicts_with = "clone", num_args = 0..=1,
          default_missing_value = "test/accuracy")]
    promote: Option<String>,
    /// Improvement required to promote.
    #[arg(long, default_value_t = 0.0)]
    margin: f64,
    /// METRIC of --promote is a loss or an error: lower is better.
    #[arg(long, requires = "promote")]
    lower_is_better: bool,
    /// Tag the task's model canary (served to a share of traffic by `dsv
    /// serve`, whose feedback gate promotes or rejects it), instead of
    /// --clone or --promote; combine with --metric/--above as a threshold.
    #[arg(long, conflicts_with_all = ["clone", "promote"])]
    canary: bool,
    #[command(flatten)]
    action: CloneFlags,
}

/// `trigger add model`.
#[derive(Debug, Args)]
pub struct ModelTrig {
    /// Trigger name.
    name: String,
    /// Tags added.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Project.
    #[arg(long)]
    project: Option<String>,
    #[command(flatten)]
    action: CloneFlags,
}

/// A trigger name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// Trigger name.
    name: String,
}

/// `trigger run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Process pending events, then exit.
    #[arg(long)]
    once: bool,
}

fn open(ctx: &Ctx) -> Result<Repo, CliError> {
    crate::repo::open_repo(ctx)
}

fn clone_action(f: &CloneFlags) -> Result<Action, CliError> {
    let task = f.clone.clone().ok_or_else(|| {
        CliError::user("a trigger needs an action")
            .hint("pass --clone TASK (or --promote METRIC for task triggers)")
    })?;
    let mut overrides = BTreeMap::new();
    for s in &f.set {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| CliError::user(format!("--set '{s}' is not SECTION/KEY=VALUE")))?;
        overrides.insert(k.trim().to_string(), v.to_string());
    }
    Ok(Action::Clone {
        task,
        overrides,
        queue: f.queue.clone(),
    })
}

fn base(name: &str, on: &str, action: Action, single: bool) -> Trigger {
    Trigger {
        name: name.to_string(),
        on: on.to_string(),
        project: None,
        dataset: None,
        tags: Vec::new(),
        events: Vec::new(),
        statuses: Vec::new(),
        threshold: None,
        action,
        single_instance: single,
        cursor: 0,
        created_ms: 0,
    }
}

fn trigger_json(t: &Trigger) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// A firing on stderr.
pub fn print_firing(f: &dsv::Firing) {
    eprintln!(
        "trigger {}: event #{} ({:?}): {}",
        f.trigger, f.event, f.kind, f.note
    );
}

/// How `dsv trigger run` shows firings: on stderr, unless `--json`.
struct TriggerOutput {
    json: bool,
}

impl TriggerEvents for TriggerOutput {
    fn fired(&self, f: &dsv::Firing) {
        if !self.json {
            print_firing(f);
        }
    }
}

/// Runs a trigger command.
pub fn trigger(ctx: &Ctx, cmd: TriggerCmd) -> Result<(), CliError> {
    let repo = open(ctx)?;
    match cmd {
        TriggerCmd::Add(a) => {
            let t = match *a {
                AddCmd::Dataset(d) => {
                    let mut t = base(
                        &d.name,
                        "dataset",
                        clone_action(&d.action)?,
                        d.action.single_instance,
                    );
                    t.project = Some(d.project);
                    t.dataset = d.dataset;
                    t.tags = d.tags;
                    t.events = d.events;
                    t
                }
                AddCmd::Task(d) => {
                    let action = match &d.promote {
                        Some(m) => Action::Promote {
                            metric: m.clone(),
                            margin: d.margin,
                            lower_is_better: d.lower_is_better,
                        },
                        None if d.canary => Action::Canary,
                        None => clone_action(&d.action)?,
                    };
                    let mut t = base(&d.name, "task", action, d.action.single_instance);
                    t.project = Some(d.project);
                    t.statuses = d.statuses;
                    if let Some(m) = d.metric {
                        t.threshold = match (d.above, d.below) {
                            (Some(x), _) => Some((m, true, x)),
                            (_, Some(x)) => Some((m, false, x)),
                            _ => None,
                        };
                    }
                    t
                }
                AddCmd::Model(d) => {
                    let mut t = base(
                        &d.name,
                        "model",
                        clone_action(&d.action)?,
                        d.action.single_instance,
                    );
                    t.project = d.project;
                    t.tags = d.tags;
                    t
                }
            };
            let t = repo.add_trigger(t)?;
            if ctx.json {
                return output::json(&trigger_json(&t));
            }
            println!(
                "trigger '{}' added (fires on events after #{})",
                t.name, t.cursor
            );
            Ok(())
        }
        TriggerCmd::List => {
            let ts = repo.triggers()?;
            if ctx.json {
                return output::json(&Value::Array(ts.iter().map(trigger_json).collect()));
            }
            for t in &ts {
                println!(
                    "{:<20} on {:<8} project {:<16} cursor {:<6} {}",
                    t.name,
                    t.on,
                    t.project.clone().unwrap_or_else(|| "*".into()),
                    t.cursor,
                    match &t.action {
                        Action::Clone { task, queue, .. } =>
                            format!("clone {} → {queue}", &task[..12]),
                        Action::Promote {
                            metric,
                            margin,
                            lower_is_better: false,
                        } => format!("promote on {metric} (+{margin})"),
                        Action::Promote {
                            metric,
                            margin,
                            lower_is_better: true,
                        } => format!("promote on {metric} (-{margin}, lower is better)"),
                        Action::Canary => "tag the model canary".to_string(),
                    }
                );
            }
            Ok(())
        }
        TriggerCmd::Remove(a) => {
            repo.remove_trigger(&a.name)?;
            if ctx.json {
                return output::json(&json!({"removed": a.name}));
            }
            println!("trigger '{}' removed", a.name);
            Ok(())
        }
        TriggerCmd::History(a) => {
            let h = repo.trigger_history(&a.name)?;
            if ctx.json {
                return output::json(&serde_json::to_value(&h).unwrap_or(Value::Null));
            }
            for f in &h {
                println!(
                    "#{:<6} {}  {:?} {}  {}",
                    f.event,
                    crate::dataset::iso(f.time_ms),
                    f.kind,
                    &f.subject[..f.subject.len().min(12)],
                    f.note
                );
            }
            Ok(())
        }
        TriggerCmd::Run(a) => {
            let stop = Arc::new(AtomicBool::new(false));
            for s in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(s, stop.clone())
                    .map_err(|e| CliError::repo(format!("cannot install signal handlers: {e}")))?;
            }
            let lp = TriggerLoop::new(
                Arc::new(repo),
                TriggerOptions {
                    once: a.once,
                    ..Default::default()
                },
            );
            let all = lp.run(&stop, &TriggerOutput { json: ctx.json })?;
            if ctx.json {
                return output::json(&serde_json::to_value(&all).unwrap_or(Value::Null));
            }
            Ok(())
        }
    }
}
