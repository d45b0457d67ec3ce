//! Tasks, queues and models.
//!
//! A task is an experiment: project/name, a kind (the built-in trainer or
//! an external command), parameters in sections (`General/dataset_id`,
//! `Model/max_depth`), a status (`draft → queued → running → completed |
//! failed | aborted`), its parent (cloned from), the dataset versions it
//! read, its console log, scalars, metrics, artifacts and models. Every
//! status change is one atomic write with its event. Queues are ordered key
//! ranges in the `app` column family; taking a task is a read-and-update
//! under the repository write lock, so two agents never take the same one.

use std::collections::BTreeMap;

use dsv_store::{Batch, Cf, KvRead};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::{Event, EventKind, EventWriter};
use crate::keys;
use crate::records::{from_json, scan_json, to_json};
use crate::repo::Repo;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Editable, not queued.
    Draft,
    /// Waiting in a queue.
    Queued,
    /// An agent runs it.
    Running,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped on request.
    Aborted,
}

impl TaskStatus {
    /// The status name.
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskStatus::Draft => "draft",
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Aborted => "aborted",
        }
    }
    /// Parses a status name.
    pub fn parse(s: &str) -> Result<TaskStatus> {
        Ok(match s {
            "draft" => TaskStatus::Draft,
            "queued" => TaskStatus::Queued,
            "running" => TaskStatus::Running,
            "completed" => TaskStatus::Completed,
            "failed" => TaskStatus::Failed,
            "aborted" => TaskStatus::Aborted,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown task status '{other}' (draft, queued, running, completed, failed, aborted)"
                )))
            }
        })
    }
    /// Whether the task is finished (immutable).
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Aborted
        )
    }
}

/// Who runs a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Agent name.
    pub name: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
}

/// A task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Id (32 hex digits).
    pub id: String,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
    /// `trainer` or `command`.
    pub kind: String,
    /// The command line of a `command` task.
    #[serde(default)]
    pub command: Option<String>,
    /// Parameters, `SECTION/KEY` → value.
    pub params: BTreeMap<String, String>,
    /// Status.
    pub status: TaskStatus,
    /// The task it was cloned from.
    #[serde(default)]
    pub parent: Option<String>,
    /// Dataset versions read (hex ids).
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Final metrics, e.g. `test/accuracy`.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Series: name → (step, value).
    #[serde(default)]
    pub scalars: BTreeMap<String, Vec<(u64, f64)>>,
    /// Models it produced.
    #[serde(default)]
    pub models: Vec<String>,
    /// The version holding its output files (`artifacts/<task id>`).
    #[serde(default)]
    pub artifacts: Option<String>,
    /// Output file names.
    #[serde(default)]
    pub artifact_files: Vec<String>,
    /// Queue it was put on.
    #[serde(default)]
    pub queue: Option<String>,
    /// Times, ms since the epoch.
    pub created_ms: i64,
    /// When queued.
    #[serde(default)]
    pub queued_ms: Option<i64>,
    /// When started.
    #[serde(default)]
    pub started_ms: Option<i64>,
    /// When finished.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// Last sign of life of its agent.
    #[serde(default)]
    pub heartbeat_ms: Option<i64>,
    /// The agent running or having run it.
    #[serde(default)]
    pub agent: Option<AgentInfo>,
    /// Why it failed or was aborted.
    #[serde(default)]
    pub error: Option<String>,
    /// `dsv task abort` asked a running task to stop.
    #[serde(default)]
    pub abort_requested: bool,
    /// Log chunks written.
    #[serde(default)]
    pub log_chunks: u32,
}

impl Task {
    /// A new draft: fresh id, no run state.
    pub(crate) fn draft(
        project: &str,
        name: &str,
        kind: &str,
        command: Option<String>,
        params: BTreeMap<String, String>,
        parent: Option<String>,
    ) -> Result<Task> {
        Ok(Task {
            id: new_id()?,
            project: project.to_string(),
            name: name.to_string(),
            kind: kind.to_string(),
            command,
            params,
            status: TaskStatus::Draft,
            parent,
            inputs: Vec::new(),
            metrics: BTreeMap::new(),
            scalars: BTreeMap::new(),
            models: Vec::new(),
            artifacts: None,
            artifact_files: Vec::new(),
            queue: None,
            created_ms: dsv_store::store::now_ms(),
            queued_ms: None,
            started_ms: None,
            finished_ms: None,
            heartbeat_ms: None,
            agent: None,
            error: None,
            abort_requested: false,
            log_chunks: 0,
        })
    }

    /// A draft copy of this task (parent = this one) with `params`.
    pub(crate) fn child(&self, name: &str, params: BTreeMap<String, String>) -> Result<Task> {
        Task::draft(
            &self.project,
            name,
            &self.kind,
            self.command.clone(),
            params,
            Some(self.id.clone()),
        )
    }
}

/// A stored model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Id (32 hex digits).
    pub id: String,
    /// Project (the task's).
    pub project: String,
    /// Name (the task's).
    pub name: String,
    /// Model kind (`logistic`, `tree`, …).
    pub kind: String,
    /// The task that produced it.
    pub task: String,
    /// Dataset versions it was trained and evaluated on (hex ids).
    pub datasets: Vec<String>,
    /// Its metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Tags (`production`, `candidate`, …).
    pub tags: Vec<String>,
    /// When stored, ms.
    pub created_ms: i64,
}

/// How a task ended, as reported by whoever ran it.
#[derive(Debug, Clone, Default)]
pub struct Finish {
    /// `Completed`, `Failed` or `Aborted`.
    pub status: Option<TaskStatus>,
    /// Why it failed.
    pub error: Option<String>,
    /// Metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Scalars.
    pub scalars: BTreeMap<String, Vec<(u64, f64)>>,
    /// Dataset versions read.
    pub inputs: Vec<String>,
    /// Log text not yet stored.
    pub log: String,
    /// A model to store: kind and serialized body.
    pub model: Option<(String, Vec<u8>)>,
    /// Output version and file names.
    pub artifacts: Option<(String, Vec<String>)>,
    /// The run this result belongs to (the task's `started_ms` when it was
    /// started): a result from a run that was reaped and started again
    /// elsewhere is refused. `None`: whichever run is current.
    pub run_started_ms: Option<i64>,
}

/// A task or model id: 16 bytes from the OS random generator, as 32 hex digits.
fn new_id() -> Result<String> {
    Ok(crate::records::DatasetId::random()?.to_string())
}

fn task_key(id: &str) -> Vec<u8> {
    [keys::TASK, id.as_bytes()].concat()
}
fn queue_key(queue: &str, ms: i64, id: &str) -> Vec<u8> {
    [
        keys::QUEUE,
        queue.as_bytes(),
        &[0],
        &(ms.max(0) as u64).to_be_bytes(),
        id.as_bytes(),
    ]
    .concat()
}
fn log_key(id: &str, chunk: u32) -> Vec<u8> {
    [keys::TASK_LOG, id.as_bytes(), &chunk.to_be_bytes()].concat()
}
fn model_key(id: &str) -> Vec<u8> {
    [keys::MODEL, id.as_bytes()].concat()
}
fn model_body_key(id: &str) -> Vec<u8> {
    [keys::MODEL_BODY, id.as_bytes()].concat()
}

fn task_in(kv: &dyn KvRead, id: &str) -> Result<Task> {
    match kv.get(Cf::App, &task_key(id))? {
        Some(v) => from_json(&v, "task"),
        None => Err(Error::Invalid(format!("no task {id}"))),
    }
}

pub(crate) fn status_event(ev: &mut EventWriter, b: &mut Batch, t: &Task) {
    let mut e = Event::new(EventKind::TaskStatus);
    e.project = t.project.clone();
    e.name = t.name.clone();
    e.extra.insert("task".into(), serde_json::json!(t.id));
    e.extra
        .insert("status".into(), serde_json::json!(t.status.as_str()));
    if let Some(p) = &t.parent {
        e.extra.insert("parent".into(), serde_json::json!(p));
    }
    if !t.metrics.is_empty() {
        e.extra
            .insert("metrics".into(), serde_json::json!(t.metrics));
    }
    if let Some(m) = t.models.first() {
        e.extra.insert("model".into(), serde_json::json!(m));
    }
    ev.push(b, e);
}

fn prefix_match<T>(
    kv: &dyn KvRead,
    prefix: &[u8],
    id_prefix: &str,
    what: &str,
    decode: impl Fn(&[u8]) -> Result<T>,
) -> Result<T> {
    let p = id_prefix.trim().to_ascii_lowercase();
    if p.len() < 4 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Invalid(format!(
            "'{id_prefix}' is not a {what} id (4 or more hex digits)"
        )));
    }
    let mut found = Vec::new();
    kv.scan(Cf::App, &[prefix, p.as_bytes()].concat(), &mut |_, v| {
        found.push(v.to_vec());
        Ok(found.len() < 2)
    })?;
    match found.len() {
        0 => Err(Error::Invalid(format!("no {what} with id {id_prefix}"))),
        1 => decode(&found[0]),
        _ => Err(Error::Invalid(format!(
            "{what} id prefix {id_prefix} is ambiguous; give more digits"
        ))),
    }
}

impl Repo {
    /// A new draft task.
    pub fn create_task(
        &self,
        project: &str,
        name: &str,
        kind: &str,
        command: Option<String>,
        params: BTreeMap<String, String>,
    ) -> Result<Task> {
        crate::rev::parse_dataset_name(&format!("{project}/{name}"))?;
        if !["trainer", "command"].contains(&kind) {
            return Err(Error::Invalid(format!("unknown task kind '{kind}'")));
        }
        if kind == "command" && command.as_deref().is_none_or(|c| c.trim().is_empty()) {
            return Err(Error::Invalid("a command task needs --command CMD".into()));
        }
        crate::params::check_task_params(kind, &params)?;
        let t = Task::draft(project, name, kind, command, params, None)?;
        self.write(|kv| {
            let mut b = Batch::default();
            b.put(Cf::App, task_key(&t.id), to_json(&t));
            let mut ev = EventWriter::new(kv)?;
            status_event(&mut ev, &mut b, &t);
            Ok((b, ()))
        })?;
        Ok(t)
    }

    /// A draft copy of a task with parameter overrides (`SECTION/KEY` → value).
    pub fn clone_task(
        &self,
        id: &str,
        name: Option<&str>,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Task> {
        let src = self.task(id)?;
        let mut params = src.params.clone();
        for (k, v) in overrides {
            crate::params::check_key_form(k)?;
            params.insert(k.clone(), v.clone());
        }
        crate::params::check_task_params(&src.kind, &params)?;
        // A pinned dataset version that no longer exists (deleted by an
        // older build, which kept nothing): say so now, not when it runs.
        for k in DATASET_PARAMS {
            let Some(val) = params.get(k) else { continue };
            if let Ok(crate::rev::RevSpec::Id(_)) = crate::rev::RevSpec::parse(val) {
                if let Err(e) = self.resolve(val) {
                    if !e.is_repository_problem() {
                        let whose = if overrides.contains_key(k) {
                            "--set".to_string()
                        } else {
                            format!("task {}", &src.id[..12])
                        };
                        return Err(Error::Invalid(format!(
                            "{k} = {val} (from {whose}) names no dataset version: {e}; \
                             clone with --set {k}=REV to train on another version"
                        )));
                    }
                }
            }
        }
        let t = src.child(name.unwrap_or(&src.name), params)?;
        crate::rev::parse_dataset_name(&format!("{}/{}", t.project, t.name))?;
        self.write(|kv| {
            let mut b = Batch::default();
            b.put(Cf::App, task_key(&t.id), to_json(&t));
            let mut ev = EventWriter::new(kv)?;
            status_event(&mut ev, &mut b, &t);
            Ok((b, ()))
        })?;
        Ok(t)
    }

    /// A task by id or unique id prefix (4+ hex digits).
    pub fn task(&self, id: &str) -> Result<Task> {
        let kv = self.store().reader();
        prefix_match(&*kv, keys::TASK, id, "task", |v| from_json(v, "task"))
    }

    /// Tasks, newest first, optionally of one project and/or status.
    pub fn tasks(&self, project: Option<&str>, status: Option<TaskStatus>) -> Result<Vec<Task>> {
        let kv = self.store().reader();
        let mut out = scan_json(&*kv, keys::TASK, "task", |t: &Task| {
            project.is_none_or(|p| t.project == p) && status.is_none_or(|s| t.status == s)
        })?;
        out.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        Ok(out)
    }

    /// Puts a draft task on a queue.
    pub fn enqueue(&self, id: &str, queue: &str) -> Result<Task> {
        let id = self.task(id)?.id;
        if queue.is_empty() || queue.contains('\0') {
            return Err(Error::Invalid(format!("invalid queue name '{queue}'")));
        }
        self.write(|kv| {
            let mut t = task_in(kv, &id)?;
            if t.status != TaskStatus::Draft {
                return Err(Error::Invalid(format!(
                    "task {} is {}; only a draft can be queued (clone it to run it again)",
                    &t.id[..12],
                    t.status.as_str()
                )));
            }
            let mut b = Batch::default();
            queue_batch(&mut b, &mut t, queue);
            let mut ev = EventWriter::new(kv)?;
            status_event(&mut ev, &mut b, &t);
            Ok((b, t))
        })
    }

    /// Takes the oldest task of `queues` for `agent` (atomically: two agents
    /// never take the same task) and marks it running.
    pub fn dequeue(&self, queues: &[String], agent: &AgentInfo) -> Result<Option<Task>> {
        // Cheap check without the lock first.
        let kv = self.store().reader();
        if !queues.iter().any(|q| {
            let mut any = false;
            let _ = kv.scan(
                Cf::App,
                &[keys::QUEUE, q.as_bytes(), &[0]].concat(),
                &mut |_, _| {
                    any = true;
                    Ok(false)
                },
            );
            any
        }) {
            return Ok(None);
        }
        self.write(|kv| {
            let mut best: Option<(Vec<u8>, u64, String)> = None;
            for q in queues {
                let prefix = [keys::QUEUE, q.as_bytes(), &[0]].concat();
                kv.scan(Cf::App, &prefix, &mut |k, _| {
                    let rest = &k[prefix.len()..];
                    if rest.len() > 8 {
                        let ms = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
                        let id = String::from_utf8_lossy(&rest[8..]).into_owned();
                        if best.as_ref().is_none_or(|(_, m, _)| ms < *m) {
                            best = Some((k.to_vec(), ms, id));
                        }
                    }
                    Ok(false)
                })?;
            }
            let Some((key, _, id)) = best else {
                return Ok((Batch::default(), None));
            };
            let mut b = Batch::default();
            b.delete(Cf::App, key);
            let mut t = task_in(kv, &id)?;
            let now = dsv_store::store::now_ms();
            t.status = TaskStatus::Running;
            t.started_ms = Some(now);
            t.heartbeat_ms = Some(now);
            t.agent = Some(agent.clone());
            b.put(Cf::App, task_key(&t.id), to_json(&t));
            let mut ev = EventWriter::new(kv)?;
            status_event(&mut ev, &mut b, &t);
            Ok((b, Some(t)))
        })
    }

    /// Starts a draft or queued task here and now (`dsv task run`).
    pub fn start_task(&self, id: &str, agent: &AgentInfo) -> Result<Task> {
        let id = self.task(id)?.id;
        self.write(|kv| {
            let mut t = task_in(kv, &id)?;
            let mut b = Batch::default();
            match t.status {
                TaskStatus::Draft => {}
                TaskStatus::Queued => {
                    if let (Some(q), Some(ms)) = (&t.queue, t.queued_ms) {
                        b.delete(Cf::App, queue_key(q, ms, &t.id));
                    }
                }
                s => {
                    return Err(Error::Invalid(format!(
                        "task {} is {}; clone it to run it again",
                        &t.id[..12],
                        s.as_str()
                    )))
                }
            }
            let now = dsv_store::store::now_ms();
            t.status = TaskStatus::Running;
            t.started_ms = Some(now);
            t.heartbeat_ms = Some(now);
            t.agent = Some(agent.clone());
            b.put(Cf::App, task_key(&t.id), to_json(&t));
            let mut ev = EventWriter::new(kv)?;
            status_event(&mut ev, &mut b, &t);
            Ok((b, t))
        })
    }

    /// Records a sign of life and any new log text; returns whether an abort
    /// was requested.
    pub fn heartbeat(&self, id: &str, log: &str) -> Result<bool> {
        self.heartbeat_run(id, None, log)
    }

    /// [`Repo::heartbeat`] of the run started at `run_started_ms`: a run
    /// that is no longer the task's current one (reaped, then started again
    /// by another agent) is told to stop, and its log is not recorded.
    pub fn heartbeat_run(&self, id: &str, run_started_ms: Option<i64>, log: &str) -> Result<bool> {
        self.write(|kv| {
            let mut t = task_in(kv, id)?;
            let mut b = Batch::default();
            if t.status != TaskStatus::Running
                || run_started_ms.is_some_and(|s| t.started_ms != Some(s))
            {
                return Ok((b, true));
            }
            t.heartbeat_ms = Some(dsv_store::store::now_ms());
            if !log.is_empty() {
                b.put(Cf::App, log_key(id, t.log_chunks), log.as_bytes().to_vec());
                t.log_chunks += 1;
            }
            b.put(Cf::App, task_key(id), to_json(&t));
            Ok((b, t.abort_requested))
        })
    }

    /// Records how a running task ended, with its model and outputs, in one write.
    pub fn finish_task(&self, id: &str, f: Finish) -> Result<Task> {
        self.write(|kv| {
            let mut t = task_in(kv, id)?;
            if t.status != TaskStatus::Running {
                return Err(Error::Conflict(format!(
                    "task {} is no longer running (it is {})",
                    &t.id[..12],
                    t.status.as_str()
                )));
            }
            if let Some(s) = f.run_started_ms {
                if t.started_ms != Some(s) {
                    return Err(Error::Conflict(format!(
                        "task {} was started again by agent '{}' after this run was given up; \
                         this run's result is dropped",
                        &t.id[..12],
                        t.agent.as_ref().map(|a| a.name.as_str()).unwrap_or("?")
                    )));
                }
            }
            let mut b = Batch::default();
            let mut ev = EventWriter::new(kv)?;
            let now = dsv_store::store::now_ms();
            if !f.log.is_empty() {
                b.put(
                    Cf::App,
                    log_key(id, t.log_chunks),
                    f.log.as_bytes().to_vec(),
                );
                t.log_chunks += 1;
            }
            t.status = if t.abort_requested && f.status != Some(TaskStatus::Failed) {
                TaskStatus::Aborted
            } else {
                f.status.unwrap_or(TaskStatus::Completed)
            };
            t.error = f.error.clone();
            if t.status == TaskStatus::Aborted && t.error.is_none() {
                t.error = Some("aborted on request".into());
            }
            t.metrics = f.metrics.clone();
            t.scalars = f.scalars.clone();
            t.inputs = f.inputs.clone();
            t.finished_ms = Some(now);
            if let Some((v, files)) = &f.artifacts {
                t.artifacts = Some(v.clone());
                t.artifact_files = files.clone();
            }
            if let (Some((kind, body)), TaskStatus::Completed) = (&f.model, t.status) {
                let m = Model {
                    id: new_id()?,
                    project: t.project.clone(),
                    name: t.name.clone(),
                    kind: kind.clone(),
                    task: t.id.clone(),
                    datasets: t.inputs.clone(),
                    metrics: t.metrics.clone(),
                    tags: Vec::new(),
                    created_ms: now,
                };
                b.put(Cf::App, model_key(&m.id), to_json(&m));
                b.put(Cf::App, model_body_key(&m.id), body.clone());
                t.models.push(m.id.clone());
                let mut e = Event::new(EventKind::ModelCreated);
                e.project = m.project.clone();
                e.name = m.name.clone();
                e.extra.insert("model".into(), serde_json::json!(m.id));
                e.extra.insert("task".into(), serde_json::json!(t.id));
                e.extra
                    .insert("metrics".into(), serde_json::json!(m.metrics));
                ev.push(&mut b, e);
            }
            b.put(Cf::App, task_key(id), to_json(&t));
            status_event(&mut ev, &mut b, &t);
            Ok((b, t))
        })
    }

    /// Stops a task: a draft or queued one at once, a running one through
    /// its agent (which sees the request at its next heartbeat).
    pub fn abort_task(&self, id: &str) -> Result<Task> {
        let id = self.task(id)?.id;
        self.write(|kv| {
            let mut t = task_in(kv, &id)?;
            let mut b = Batch::default();
            match t.status {
                TaskStatus::Draft | TaskStatus::Queued => {
                    if let (TaskStatus::Queued, Some(q), Some(ms)) =
                        (t.status, &t.queue, t.queued_ms)
                    {
                        b.delete(Cf::App, queue_key(q, ms, &t.id));
                    }
                    t.status = TaskStatus::Aborted;
                    t.error = Some("aborted before it ran".into());
                    t.finished_ms = Some(dsv_store::store::now_ms());
                    let mut ev = EventWriter::new(kv)?;
                    b.put(Cf::App, task_key(&t.id), to_json(&t));
                    status_event(&mut ev, &mut b, &t);
                }
                TaskStatus::Running => {
                    t.abort_requested = true;
                    b.put(Cf::App, task_key(&t.id), to_json(&t));
                }
                s => {
                    return Err(Error::Invalid(format!(
                        "task {} is already {}",
                        &t.id[..12],
                        s.as_str()
                    )))
                }
            }
            Ok((b, t))
        })
    }

    /// Resolves tasks left `running` by agents that died: `alive` says
    /// whether an agent process still exists (when it can tell), and a
    /// heartbeat older than `dead_after_ms` counts as dead. Such tasks are
    /// requeued (`requeue`) or marked failed with the reason.
    pub fn reap_dead_tasks(
        &self,
        alive: &dyn Fn(&AgentInfo) -> Option<bool>,
        dead_after_ms: i64,
        requeue: bool,
    ) -> Result<Vec<Task>> {
        let now = dsv_store::store::now_ms();
        let mut dead = Vec::new();
        for t in self.tasks(None, Some(TaskStatus::Running))? {
            let Some(a) = &t.agent else { continue };
            let why = match alive(a) {
                Some(false) => Some(format!(
                    "agent '{}' (pid {} on {}) died while running it",
                    a.name, a.pid, a.host
                )),
                // Its process is there: late heartbeats mean a busy lock
                // (a long gc), not a dead agent.
                Some(true) => None,
                None if now - t.heartbeat_ms.unwrap_or(0) > dead_after_ms => Some(format!(
                    "agent '{}' (pid {} on {}) sent no heartbeat for {} s",
                    a.name,
                    a.pid,
                    a.host,
                    (now - t.heartbeat_ms.unwrap_or(0)) / 1000
                )),
                _ => None,
            };
            if let Some(why) = why {
                dead.push((t, why));
            }
        }
        let mut out = Vec::new();
        for (seen, why) in dead {
            let r = self.write(|kv| {
                let mut t = task_in(kv, &seen.id)?;
                let mut b = Batch::default();
                // Still the run we judged, with no heartbeat since: otherwise
                // it finished, or was requeued and started again meanwhile.
                if t.status != TaskStatus::Running
                    || t.agent != seen.agent
                    || t.started_ms != seen.started_ms
                    || t.heartbeat_ms != seen.heartbeat_ms
                {
                    return Ok((b, None));
                }
                let mut ev = EventWriter::new(kv)?;
                if requeue {
                    let q = t.queue.clone().unwrap_or_else(|| "default".into());
                    t.error = Some(format!("{why}; requeued"));
                    t.agent = None;
                    queue_batch(&mut b, &mut t, &q);
                } else {
                    t.status = TaskStatus::Failed;
                    t.error = Some(why.clone());
                    t.finished_ms = Some(dsv_store::store::now_ms());
                    b.put(Cf::App, task_key(&t.id), to_json(&t));
                }
                status_event(&mut ev, &mut b, &t);
                Ok((b, Some(t)))
            })?;
            out.extend(r);
        }
        Ok(out)
    }

    /// A task's console log.
    pub fn task_log(&self, id: &str) -> Result<String> {
        let t = self.task(id)?;
        let kv = self.store().reader();
        let mut out = String::new();
        kv.scan(
            Cf::App,
            &[keys::TASK_LOG, t.id.as_bytes()].concat(),
            &mut |_, v| {
                out.push_str(&String::from_utf8_lossy(v));
                Ok(true)
            },
        )?;
        Ok(out)
    }

    // ---- models -----------------------------------------------------------

    /// Models, newest first, optionally carrying a tag.
    pub fn models(&self, tag: Option<&str>) -> Result<Vec<Model>> {
        let kv = self.store().reader();
        let mut out = scan_json(&*kv, keys::MODEL, "model", |m: &Model| {
            tag.is_none_or(|t| m.tags.iter().any(|x| x == t))
        })?;
        out.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
        Ok(out)
    }

    /// A model by id prefix, or `PROJECT/NAME@TAG` (the newest with the tag).
    pub fn model(&self, spec: &str) -> Result<Model> {
        if let Some((pn, tag)) = spec.split_once('@') {
            let (project, name) = crate::rev::parse_dataset_name(pn)?;
            return self
                .models(Some(tag))?
                .into_iter()
                .find(|m| m.project == project && m.name == name)
                .ok_or_else(|| Error::Invalid(format!("no model of {pn} is tagged '{tag}'")));
        }
        let kv = self.store().reader();
        prefix_match(&*kv, keys::MODEL, spec, "model", |v| from_json(v, "model"))
    }

    /// A model's serialized body.
    pub fn model_body(&self, m: &Model) -> Result<Vec<u8>> {
        self.store()
            .reader()
            .get(Cf::App, &model_body_key(&m.id))?
            .ok_or_else(|| Error::corrupted(format!("model {}", m.id), "its body is missing"))
    }

    /// Adds and removes model tags (one write, one event).
    pub fn tag_model(&self, spec: &str, add: &[String], remove: &[String]) -> Result<Model> {
        let id = self.model(spec)?.id;
        for t in add {
            dsv_store::store::validate_label(t, "tag")?;
        }
        self.write(|kv| {
            let mut m: Model = match kv.get(Cf::App, &model_key(&id))? {
                Some(v) => from_json(&v, "model")?,
                None => return Err(Error::Invalid(format!("no model {id}"))),
            };
            let mut added = Vec::new();
            let mut removed = Vec::new();
            for t in add {
                if !m.tags.contains(t) {
                    m.tags.push(t.clone());
                    added.push(t.clone());
                }
            }
            for t in remove {
                if let Some(i) = m.tags.iter().position(|x| x == t) {
                    m.tags.remove(i);
                    removed.push(t.clone());
                }
            }
            let mut b = Batch::default();
            if added.is_empty() && removed.is_empty() {
                return Ok((b, m));
            }
            b.put(Cf::App, model_key(&m.id), to_json(&m));
            let mut ev = EventWriter::new(kv)?;
            let mut e = Event::new(EventKind::ModelTagged);
            e.project = m.project.clone();
            e.name = m.name.clone();
            e.tags = m.tags.clone();
            e.tags_added = added;
            e.tags_removed = removed;
            e.extra.insert("model".into(), serde_json::json!(m.id));
            ev.push(&mut b, e);
            Ok((b, m))
        })
    }
}

/// Puts `t` on `queue` now: its status, its queue entry and its record in `b`.
pub(crate) fn queue_batch(b: &mut Batch, t: &mut Task, queue: &str) {
    let now = dsv_store::store::now_ms();
    t.status = TaskStatus::Queued;
    t.queue = Some(queue.to_string());
    t.queued_ms = Some(now);
    b.put(Cf::App, queue_key(queue, now, &t.id), Vec::new());
    b.put(Cf::App, task_key(&t.id), to_json(t));
}

/// Tags `new` `production` and moves the previous production model (if
/// any) to `previous`, with one model event.
pub(crate) fn promote_batch(
    kv: &dyn KvRead,
    b: &mut Batch,
    ev: &mut EventWriter,
    new: &str,
    old: Option<&str>,
) -> Result<()> {
    let load = |id: &str| -> Result<Model> {
        match kv.get(Cf::App, &model_key(id))? {
            Some(v) => from_json(&v, "model"),
            None => Err(Error::Invalid(format!("no model {id}"))),
        }
    };
    let mut m = load(new)?;
    if !m.tags.iter().any(|t| t == "production") {
        m.tags.push("production".into());
    }
    m.tags.retain(|t| t != "previous");
    b.put(Cf::App, model_key(&m.id), to_json(&m));
    let mut e = Event::new(EventKind::ModelTagged);
    e.project = m.project.clone();
    e.name = m.name.clone();
    e.tags = m.tags.clone();
    e.tags_added = vec!["production".into()];
    e.extra.insert("model".into(), serde_json::json!(m.id));
    // Every other production model of the project steps down, not only the
    // one the decision saw: two gates deciding at once must not leave two
    // models tagged production.
    let mut raw: Vec<Vec<u8>> = Vec::new();
    kv.scan(Cf::App, keys::MODEL, &mut |_, v| {
        raw.push(v.to_vec());
        Ok(true)
    })?;
    let mut others: Vec<Model> = Vec::new();
    for v in raw {
        let o: Model = from_json(&v, "model")?;
        if o.project == m.project && o.id != m.id && o.tags.iter().any(|t| t == "production") {
            others.push(o);
        }
    }
    if let Some(old) = old {
        if !others.iter().any(|o| o.id == old) {
            others.push(load(old)?);
        }
    }
    for mut o in others {
        o.tags.retain(|t| t != "production");
        if !o.tags.iter().any(|t| t == "previous") {
            o.tags.push("previous".into());
        }
        b.put(Cf::App, model_key(&o.id), to_json(&o));
        if Some(o.id.as_str()) == old || !e.extra.contains_key("previous") {
            e.extra.insert("previous".into(), serde_json::json!(o.id));
        }
    }
    ev.push(b, e);
    Ok(())
}

/// The task parameters that name dataset versions (the trainer's training
/// and evaluation data).
pub const DATASET_PARAMS: [&str; 2] = ["General/dataset_id", "General/test_dataset_id"];

/// Whether a parameter value pins `v`: its id (or an id prefix of 6+ hex
/// digits), or `PROJECT/NAME@VERSION` of its dataset. `PROJECT/NAME` and
/// `@TAG` float (they mean whatever is newest when the task runs), except
/// for a running task: `PROJECT/NAME` is what it is reading when `v` is
/// the dataset's latest (`running_latest`).
fn pins(value: &str, v: &crate::DatasetVersion, running_latest: bool) -> bool {
    match crate::rev::RevSpec::parse(value) {
        Ok(crate::rev::RevSpec::Dataset {
            project,
            name,
            selector: None,
        }) => running_latest && project == v.dataset.project && name == v.dataset.name,
        Ok(crate::rev::RevSpec::Id(p)) => v.id.to_hex().starts_with(&p),
        Ok(crate::rev::RevSpec::Dataset {
            project,
            name,
            selector: Some(sel),
        }) => {
            project == v.dataset.project
                && name == v.dataset.name
                && crate::records::same_version(&v.version, &sel)
        }
        _ => false,
    }
}

/// Tasks and models that reference `v`, described for messages: a task
/// whose dataset parameters pin it, that read it (`inputs`) or whose
/// outputs it holds (`artifacts`); a model trained or evaluated on it.
pub(crate) fn references_in(kv: &dyn KvRead, v: &crate::DatasetVersion) -> Result<Vec<String>> {
    let hex = v.id.to_hex();
    let latest = crate::repo::is_latest_in(kv, v)?;
    let mut out = Vec::new();
    let mut tasks = scan_json(kv, keys::TASK, "task", |_: &Task| true)?;
    tasks.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    for t in &tasks {
        let mut how: Vec<&str> = DATASET_PARAMS
            .iter()
            .filter(|k| {
                t.params
                    .get(**k)
                    .is_some_and(|x| pins(x, v, latest && t.status == TaskStatus::Running))
            })
            .copied()
            .collect();
        if t.inputs.contains(&hex) {
            how.push("its input");
        }
        if t.artifacts.as_deref() == Some(hex.as_str()) {
            how.push("its artifacts");
        }
        if !how.is_empty() {
            out.push(format!(
                "task {} ({}/{}, {}: {})",
                &t.id[..t.id.len().min(12)],
                t.project,
                t.name,
                t.status.as_str(),
                how.join(", ")
            ));
        }
    }
    let mut models = scan_json(kv, keys::MODEL, "model", |m: &Model| {
        m.datasets.contains(&hex)
    })?;
    models.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    for m in &models {
        out.push(format!(
            "model {} ({}/{})",
            &m.id[..m.id.len().min(12)],
            m.project,
            m.name
        ));
    }
    Ok(out)
}
