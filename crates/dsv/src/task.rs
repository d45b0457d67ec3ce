//! Tasks, queues and models.
//!
//! A task is an experiment: project/name, a kind (the built-in trainer or
//! an external command), parameters in sections (`General/dataset_id`,
//! `Model/max_depth`), a status (`draft → queued → running → completed |
//! failed | aborted`), its parent (cloned from), the dataset versions it
//! read, its console log, scalars, metrics, artifacts and models. Every
//! status change is one atomic write with its event. Queues are ordered key
//! ranges in the `app` column family; taking a task is a read-and-update
//! in one store write (a transaction), so two agents never take the same one.
//!
//! ## Leases
//!
//! A running task carries a [`Lease`]: the agent that runs it (its random
//! [`AgentInfo::id`]), the run (a random id given when the task starts),
//! and an expiry `ttl_ms` after the last renewal. The run's heartbeat
//! renews it ([`Repo::heartbeat_lease`], every `ttl / 3` by default:
//! [`DEFAULT_LEASE_TTL_MS`], [`renew_every_ms`]). The lease is
//! authoritative: any process may reap a task whose lease expired
//! ([`Repo::reap_expired`]), requeueing it or failing it; the reaped run's
//! next heartbeat answers [`Beat::Lost`] and its result is refused by
//! [`Repo::finish_task`]. A run keeps its lease until someone acts on the
//! expiry (a late renewal of a lease nobody reaped yet is accepted: the
//! reaper judges the task again inside its own write, so exactly one of
//! the two wins). Time during which the store refused every write (a long `gc`)
//! does not count against a lease ([`dsv_store::txn::stalled_ms`]). A same-host
//! check that the holder's process is gone may only reap *earlier*; a live
//! process never keeps an expired lease alive. Expiry is judged with the
//! reaper's clock against times written with the holder's: clocks of the
//! machines sharing a repository must agree to well within the ttl.

use std::collections::BTreeMap;

use dsv_store::{Batch, Cf, KvRead};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::{Event, EventKind, EventWriter};
use crate::index::{put_model, put_task, records_in};
use crate::keys;
use crate::records::{from_json, scan_json};
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
    /// Random id, unique per agent process: the holder of its leases.
    /// Empty in records written before leases.
    #[serde(default)]
    pub id: String,
}

impl AgentInfo {
    /// An agent with a fresh random id.
    pub fn new(name: impl Into<String>, host: impl Into<String>, pid: u32) -> Result<AgentInfo> {
        Ok(AgentInfo {
            name: name.into(),
            host: host.into(),
            pid,
            id: new_id()?,
        })
    }
}

/// How long a lease lasts without renewal, by default.
pub const DEFAULT_LEASE_TTL_MS: i64 = 30_000;

/// How often a run should renew a lease of `ttl_ms`: a third of it, so that
/// two renewals may be lost before it runs out.
pub fn renew_every_ms(ttl_ms: i64) -> i64 {
    (ttl_ms / 3).max(1)
}

/// A running task's lease: who holds it, for which run, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The holder's [`AgentInfo::id`].
    pub holder: String,
    /// The run's random id: a run that is not the task's current one is
    /// told to stop and its result is refused.
    pub run: String,
    /// Last renewal (or the start), ms since the epoch.
    pub renewed_ms: i64,
    /// `renewed_ms + ttl_ms`: after it (plus any store stall since the
    /// renewal) the task may be reaped.
    pub expires_ms: i64,
    /// Length of one renewal.
    pub ttl_ms: i64,
}

impl Lease {
    /// A new lease for a run starting at `now_ms`.
    fn grant(holder: &str, ttl_ms: i64, now_ms: i64) -> Result<Lease> {
        let ttl_ms = ttl_ms.max(1);
        Ok(Lease {
            holder: holder.to_string(),
            run: new_id()?,
            renewed_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl_ms),
            ttl_ms,
        })
    }

    /// Renewed at `now_ms` (never moved back by a slower clock).
    fn renew(&mut self, now_ms: i64) {
        self.renewed_ms = self.renewed_ms.max(now_ms);
        self.expires_ms = self.renewed_ms.saturating_add(self.ttl_ms);
    }

    /// Whether it ran out at `now_ms`, given `stalled_ms` of store stall
    /// since its renewal (see [`dsv_store::txn::stalled_ms`]): the expiry is pushed
    /// back by the time nobody could write.
    pub fn expired(&self, stalled_ms: i64, now_ms: i64) -> bool {
        now_ms > self.expires_ms.saturating_add(stalled_ms.max(0))
    }
}

/// The lease a running task is judged by: its own, or for a record written
/// before leases, one renewed at its last heartbeat (or start) lasting
/// `legacy_ttl_ms`. `None` for a task that is not running.
pub fn effective_lease(t: &Task, legacy_ttl_ms: i64) -> Option<Lease> {
    if t.status != TaskStatus::Running {
        return None;
    }
    if let Some(l) = &t.lease {
        return Some(l.clone());
    }
    let renewed = t.heartbeat_ms.or(t.started_ms).unwrap_or(0);
    Some(Lease {
        holder: t.agent.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
        run: String::new(),
        renewed_ms: renewed,
        expires_ms: renewed.saturating_add(legacy_ttl_ms),
        ttl_ms: legacy_ttl_ms,
    })
}

/// What a heartbeat tells the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The lease is renewed; go on.
    Continue,
    /// The lease is renewed, and `dsv task abort` asked the run to stop.
    Abort,
    /// The run no longer holds the task (reaped, requeued, finished, or
    /// started again elsewhere): stop; its result will be refused.
    Lost,
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
    /// The lease of the run that holds it (only while running; `None` in
    /// records written before leases, judged by heartbeat age).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
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
            lease: None,
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

/// A serving gate's verdict on a canary model ([`Repo::decide_canary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryVerdict {
    /// Better than production: it becomes production.
    Promote,
    /// Worse: it is tagged `rejected`.
    Reject,
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
    /// The run this result belongs to, by its lease's run id
    /// ([`Lease::run`]): refused when the run no longer holds the task.
    /// `None`: not checked.
    pub run: Option<String>,
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
    // Why it failed, was aborted or requeued: kept in the log even when a
    // later run of the task succeeds and clears the record's error.
    if let Some(err) = &t.error {
        e.extra.insert("error".into(), serde_json::json!(err));
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
        self.write(|_| {
            let mut b = Batch::default();
            put_task(&mut b, None, &t);
            let mut ev = EventWriter::sequenced();
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
        self.write(|_| {
            let mut b = Batch::default();
            put_task(&mut b, None, &t);
            let mut ev = EventWriter::sequenced();
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

    /// Tasks, newest first, optionally of one project and/or status. With a
    /// status or a project it reads only the tasks its index lists.
    pub fn tasks(&self, project: Option<&str>, status: Option<TaskStatus>) -> Result<Vec<Task>> {
        let kv = self.store().reader();
        tasks_in(&*kv, project, status)
    }

    /// Puts a draft task on a queue.
    pub fn enqueue(&self, id: &str, queue: &str) -> Result<Task> {
        let id = self.task(id)?.id;
        if queue.is_empty() || queue.contains('\0') {
            return Err(Error::Invalid(format!("invalid queue name '{queue}'")));
        }
        self.write(|kv| {
            let old = task_in(kv, &id)?;
            if old.status != TaskStatus::Draft {
                return Err(Error::Invalid(format!(
                    "task {} is {}; only a draft can be queued (clone it to run it again)",
                    &old.id[..12],
                    old.status.as_str()
                )));
            }
            let mut t = old.clone();
            let mut b = Batch::default();
            queue_batch(&mut b, Some(&old), &mut t, queue);
            let mut ev = EventWriter::sequenced();
            status_event(&mut ev, &mut b, &t);
            Ok((b, t))
        })
    }

    /// Takes the oldest task of `queues` for `agent` (atomically: two agents
    /// never take the same task) and marks it running, with a lease of
    /// [`DEFAULT_LEASE_TTL_MS`] held by the agent.
    pub fn dequeue(&self, queues: &[String], agent: &AgentInfo) -> Result<Option<Task>> {
        self.dequeue_at(queues, agent, DEFAULT_LEASE_TTL_MS, self.store().now_ms())
    }

    /// [`Repo::dequeue`] at `now_ms` with a lease of `ttl_ms`.
    pub fn dequeue_at(
        &self,
        queues: &[String],
        agent: &AgentInfo,
        ttl_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Task>> {
        // Cheap check without the lock first (where a claim takes one).
        if !self.store().claims_concurrently()
            && !queues.iter().any(|q| {
                let kv = self.store().reader();
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
            })
        {
            return Ok(None);
        }
        // A claim: concurrent agents get different entries (the oldest
        // one nobody else holds, per queue) instead of conflicting on the
        // first.
        let prefixes: Vec<Vec<u8>> = queues
            .iter()
            .map(|q| [keys::QUEUE, q.as_bytes(), &[0]].concat())
            .collect();
        self.claim(&prefixes, |kv, found| {
            let mut best: Option<(&[u8], u64, String)> = None;
            for (k, _) in found {
                let Some(prefix) = prefixes.iter().find(|p| k.starts_with(p)) else {
                    continue;
                };
                let rest = &k[prefix.len()..];
                if rest.len() > 8 {
                    let ms = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
                    let id = String::from_utf8_lossy(&rest[8..]).into_owned();
                    if best.as_ref().is_none_or(|(_, m, _)| ms < *m) {
                        best = Some((k, ms, id));
                    }
                }
            }
            let Some((key, _, id)) = best else {
                return Ok((Batch::default(), None));
            };
            let mut b = Batch::default();
            b.delete(Cf::App, key.to_vec());
            let old = task_in(kv, &id)?;
            let mut t = old.clone();
            run_here(&mut t, agent, ttl_ms, now_ms)?;
            put_task(&mut b, Some(&old), &t);
            let mut ev = EventWriter::sequenced();
            status_event(&mut ev, &mut b, &t);
            Ok((b, Some(t)))
        })
    }

    /// Starts a draft or queued task here and now (`dsv task run`), with a
    /// lease of [`DEFAULT_LEASE_TTL_MS`] held by `agent`.
    pub fn start_task(&self, id: &str, agent: &AgentInfo) -> Result<Task> {
        self.start_task_at(id, agent, DEFAULT_LEASE_TTL_MS, self.store().now_ms())
    }

    /// [`Repo::start_task`] at `now_ms` with a lease of `ttl_ms`.
    pub fn start_task_at(
        &self,
        id: &str,
        agent: &AgentInfo,
        ttl_ms: i64,
        now_ms: i64,
    ) -> Result<Task> {
        let id = self.task(id)?.id;
        self.write(|kv| {
            let old = task_in(kv, &id)?;
            let mut t = old.clone();
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
            run_here(&mut t, agent, ttl_ms, now_ms)?;
            put_task(&mut b, Some(&old), &t);
            let mut ev = EventWriter::sequenced();
            status_event(&mut ev, &mut b, &t);
            Ok((b, t))
        })
    }

    /// Records a sign of life and any new log text; returns whether an abort
    /// was requested.
    pub fn heartbeat(&self, id: &str, log: &str) -> Result<bool> {
        self.heartbeat_run(id, None, log)
    }

    /// [`Repo::heartbeat`] of the run started at `run_started_ms`: renews
    /// its lease; a run that is no longer the task's current one (reaped,
    /// then started again by another agent) is told to stop (`true`, like an
    /// abort request), and its log is not recorded.
    pub fn heartbeat_run(&self, id: &str, run_started_ms: Option<i64>, log: &str) -> Result<bool> {
        let beat = self.beat(
            id,
            &|t: &Task| run_started_ms.is_none_or(|s| t.started_ms == Some(s)),
            log,
            self.store().now_ms(),
        )?;
        Ok(beat != Beat::Continue)
    }

    /// Renews the lease of run `run` ([`Lease::run`]) of task `id` at
    /// `now_ms` and stores new log text, in one write. [`Beat::Lost`] when
    /// the run no longer holds the task (its log is then not recorded).
    pub fn heartbeat_lease(&self, id: &str, run: &str, log: &str, now_ms: i64) -> Result<Beat> {
        self.beat(
            id,
            &|t: &Task| t.lease.as_ref().is_some_and(|l| l.run == run),
            log,
            now_ms,
        )
    }

    fn beat(&self, id: &str, holds: &dyn Fn(&Task) -> bool, log: &str, now: i64) -> Result<Beat> {
        self.write(|kv| {
            let old = task_in(kv, id)?;
            let mut b = Batch::default();
            if old.status != TaskStatus::Running || !holds(&old) {
                return Ok((b, Beat::Lost));
            }
            let mut t = old.clone();
            t.heartbeat_ms = Some(now);
            match &mut t.lease {
                Some(l) => l.renew(now),
                // A run started before leases: it gets one now.
                None => {
                    let holder = t.agent.as_ref().map(|a| a.id.clone()).unwrap_or_default();
                    t.lease = Some(Lease::grant(&holder, DEFAULT_LEASE_TTL_MS, now)?);
                }
            }
            if !log.is_empty() {
                b.put(Cf::App, log_key(id, t.log_chunks), log.as_bytes().to_vec());
                t.log_chunks += 1;
            }
            put_task(&mut b, Some(&old), &t);
            let beat = if t.abort_requested {
                Beat::Abort
            } else {
                Beat::Continue
            };
            Ok((b, beat))
        })
    }

    /// Records how a running task ended, with its model and outputs, in one write.
    pub fn finish_task(&self, id: &str, f: Finish) -> Result<Task> {
        self.write(|kv| {
            let old = task_in(kv, id)?;
            let mut t = old.clone();
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
            if let Some(run) = &f.run {
                if t.lease.as_ref().is_none_or(|l| &l.run != run) {
                    return Err(Error::Conflict(format!(
                        "task {} is no longer held by this run (its lease was given up and \
                         the task started again by agent '{}'); this run's result is dropped",
                        &t.id[..12],
                        t.agent.as_ref().map(|a| a.name.as_str()).unwrap_or("?")
                    )));
                }
            }
            let mut b = Batch::default();
            let mut ev = EventWriter::sequenced();
            let now = self.store().now_ms();
            t.lease = None;
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
                put_model(&mut b, None, &m);
                b.put(Cf::App, model_body_key(&m.id), body.clone());
                t.models.push(m.id.clone());
                ev.push(&mut b, model_created(&m));
            }
            put_task(&mut b, Some(&old), &t);
            status_event(&mut ev, &mut b, &t);
            Ok((b, t))
        })
    }

    /// Stops a task: a draft or queued one at once, a running one through
    /// its agent (which sees the request at its next heartbeat).
    pub fn abort_task(&self, id: &str) -> Result<Task> {
        let id = self.task(id)?.id;
        self.write(|kv| {
            let old = task_in(kv, &id)?;
            let mut t = old.clone();
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
                    t.finished_ms = Some(self.store().now_ms());
                    let mut ev = EventWriter::sequenced();
                    put_task(&mut b, Some(&old), &t);
                    status_event(&mut ev, &mut b, &t);
                }
                TaskStatus::Running => {
                    t.abort_requested = true;
                    put_task(&mut b, Some(&old), &t);
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

    /// Resolves tasks left `running` by agents that died (the interface of
    /// before leases; see [`Repo::reap_expired`]): a task whose lease
    /// expired is requeued (`requeue`) or failed, and so is one whose agent
    /// `alive` says is gone (`Some(false)`: a same-host check, which may
    /// only reap earlier; a live process never keeps an expired lease).
    /// `dead_after_ms` is the lease length of records written before
    /// leases (judged by heartbeat age).
    pub fn reap_dead_tasks(
        &self,
        alive: &dyn Fn(&AgentInfo) -> Option<bool>,
        dead_after_ms: i64,
        requeue: bool,
    ) -> Result<Vec<Task>> {
        self.reap_expired_at(
            self.store().now_ms(),
            requeue,
            &|a: &AgentInfo| alive(a) == Some(false),
            dead_after_ms,
        )
    }

    /// Reaps running tasks whose lease expired (the store's stalls since
    /// the last renewal do not count) or whose agent `dead_here` says is
    /// provably gone (a same-host pid check; `|_| false` when there is
    /// none): each is requeued on its queue (`requeue`) or failed, with
    /// the reason, in one write per task that re-checks that the lease is
    /// still the one judged. Any process may call it (agents' housekeeping,
    /// `dsv task reap`). Reads only the running tasks (index `ts/`).
    pub fn reap_expired(
        &self,
        requeue: bool,
        dead_here: &dyn Fn(&AgentInfo) -> bool,
    ) -> Result<Vec<Task>> {
        self.reap_expired_at(
            self.store().now_ms(),
            requeue,
            dead_here,
            DEFAULT_LEASE_TTL_MS,
        )
    }

    /// [`Repo::reap_expired`] judged at `now_ms`; `legacy_ttl_ms` is the
    /// lease length of records written before leases (their expiry is
    /// their last heartbeat plus it).
    pub fn reap_expired_at(
        &self,
        now_ms: i64,
        requeue: bool,
        dead_here: &dyn Fn(&AgentInfo) -> bool,
        legacy_ttl_ms: i64,
    ) -> Result<Vec<Task>> {
        self.reap_expired_with(now_ms, requeue, dead_here, legacy_ttl_ms, &|_, _| Ok(0))
    }

    /// [`Repo::reap_expired_at`] with `stalls(from, to)` telling how long
    /// the store refused every write within `[from, to]`, besides the
    /// store's own stall records (`meta stall/`, read from the view the
    /// task is judged on): asked when judging a task and again, inside the
    /// write, before reaping it. The larger of the two counts.
    pub fn reap_expired_with(
        &self,
        now_ms: i64,
        requeue: bool,
        dead_here: &dyn Fn(&AgentInfo) -> bool,
        legacy_ttl_ms: i64,
        stalls: &dyn Fn(i64, i64) -> Result<i64>,
    ) -> Result<Vec<Task>> {
        // The verdict on a running task's current record: expired (store
        // stalls since its renewal do not count) or provably dead here.
        let judge = |kv: &dyn KvRead, t: &Task| -> Result<Option<String>> {
            let Some(lease) = effective_lease(t, legacy_ttl_ms) else {
                return Ok(None);
            };
            let who = match &t.agent {
                Some(a) => format!("agent '{}' (pid {} on {})", a.name, a.pid, a.host),
                None => "its agent".to_string(),
            };
            let stalled = stalls(lease.renewed_ms, now_ms)?.max(dsv_store::txn::stalled_ms(
                kv,
                lease.renewed_ms,
                now_ms,
            )?);
            Ok(if lease.expired(stalled, now_ms) {
                Some(format!(
                    "the lease of {who} expired: no renewal for {} s",
                    (now_ms - lease.renewed_ms - stalled).max(0) / 1000
                ))
            } else if t.agent.as_ref().is_some_and(dead_here) {
                Some(format!("{who} died while running it"))
            } else {
                None
            })
        };
        let mut doomed = Vec::new();
        let view = self.store().reader();
        for t in self.tasks(None, Some(TaskStatus::Running))? {
            if judge(&*view, &t)?.is_some() {
                doomed.push(t);
            }
        }
        let mut out = Vec::new();
        for seen in doomed {
            let r = self.write(|kv| {
                let old = task_in(kv, &seen.id)?;
                let b = Batch::default();
                // Still the run we looked at (otherwise it finished, or was
                // requeued and started again meanwhile), and judged again on
                // its current record with the stalls known now: a renewal,
                // or a stall that ended, since the look keeps it.
                if old.status != TaskStatus::Running
                    || old.agent != seen.agent
                    || old.started_ms != seen.started_ms
                    || old.lease.as_ref().map(|l| &l.run) != seen.lease.as_ref().map(|l| &l.run)
                {
                    return Ok((b, None));
                }
                let Some(why) = judge(kv, &old)? else {
                    return Ok((b, None));
                };
                let mut b = b;
                let mut t = old.clone();
                t.lease = None;
                let mut ev = EventWriter::sequenced();
                if requeue {
                    let q = t.queue.clone().unwrap_or_else(|| "default".into());
                    t.error = Some(format!("{why}; requeued"));
                    t.agent = None;
                    queue_batch(&mut b, Some(&old), &mut t, &q);
                } else {
                    t.status = TaskStatus::Failed;
                    t.error = Some(why.clone());
                    t.finished_ms = Some(self.store().now_ms());
                    put_task(&mut b, Some(&old), &t);
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

    /// Models, newest first, optionally carrying a tag (read through the
    /// tag index).
    pub fn models(&self, tag: Option<&str>) -> Result<Vec<Model>> {
        self.models_in(None, tag)
    }

    /// Models, newest first, optionally of one project and/or carrying a
    /// tag. With a tag or a project it reads only the models its index
    /// lists.
    pub fn models_in(&self, project: Option<&str>, tag: Option<&str>) -> Result<Vec<Model>> {
        let kv = self.store().reader();
        models_in(&*kv, project, tag)
    }

    /// A model by id prefix, or `PROJECT/NAME@TAG` (the newest with the tag).
    pub fn model(&self, spec: &str) -> Result<Model> {
        if let Some((pn, tag)) = spec.split_once('@') {
            let (project, name) = crate::rev::parse_dataset_name(pn)?;
            return self
                .models_in(Some(&project), Some(tag))?
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

    /// Imports a model made elsewhere (a remote's): its record and body,
    /// with a `model_created` event (`extra.remote`). Nothing happens when
    /// a model with its id exists. The exclusive tags `production` and
    /// `canary` are kept only if no model of the same project here holds
    /// them (this repository's decision stands); the tags dropped are
    /// returned.
    pub fn import_model(
        &self,
        m: &Model,
        body: &[u8],
        remote: &str,
    ) -> Result<Option<Vec<String>>> {
        if m.id.len() != 32 || !m.id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::Invalid(format!(
                "model id '{}' is not 32 lowercase hex digits",
                m.id
            )));
        }
        let (p, n) = crate::rev::parse_dataset_name(&format!("{}/{}", m.project, m.name))?;
        if p != m.project || n != m.name {
            return Err(Error::Invalid(format!(
                "model {}: '{}' / '{}' is not a project and a name",
                m.id, m.project, m.name
            )));
        }
        for t in &m.tags {
            dsv_store::store::validate_label(t, "tag")?;
        }
        self.write(|kv| {
            let mut b = Batch::default();
            if kv.get(Cf::App, &model_key(&m.id))?.is_some() {
                return Ok((b, None));
            }
            let mut m = m.clone();
            let mut dropped = Vec::new();
            for t in ["production", "canary"] {
                if m.tags.iter().any(|x| x == t)
                    && models_in(kv, Some(&m.project), Some(t))?
                        .iter()
                        .any(|o| o.project == m.project)
                {
                    m.tags.retain(|x| x != t);
                    dropped.push(t.to_string());
                }
            }
            put_model(&mut b, None, &m);
            b.put(Cf::App, model_body_key(&m.id), body.to_vec());
            let mut ev = EventWriter::sequenced();
            let mut e = model_created(&m);
            e.extra.insert("remote".into(), serde_json::json!(remote));
            ev.push(&mut b, e);
            Ok((b, Some(dropped)))
        })
    }

    /// Records a serving gate's verdict on `canary` (a model tagged
    /// `canary`), compared online against `production` (`""`: none):
    /// [`CanaryVerdict::Promote`] makes it the production model (the
    /// production model steps down to `previous`), [`CanaryVerdict::Reject`]
    /// tags it `rejected`. Either way it loses the `canary` tag, in one
    /// write with one `model_tagged` event whose `extra` carries
    /// `decision`, `reason` and the gate's `online` figures (so triggers
    /// and `dsv model history` see it). A [`Error::Conflict`] when the
    /// model is no longer the canary, or the production model moved since
    /// the decision (a second server decided first).
    pub fn decide_canary(
        &self,
        canary: &str,
        production: &str,
        verdict: CanaryVerdict,
        reason: &str,
        online: serde_json::Value,
    ) -> Result<Model> {
        let id = self.model(canary)?.id;
        let decision = match verdict {
            CanaryVerdict::Promote => "promoted",
            CanaryVerdict::Reject => "rejected",
        };
        let extra = |e: &mut Event| {
            e.tags_removed = vec!["canary".into()];
            e.extra
                .insert("decision".into(), serde_json::json!(decision));
            e.extra.insert("reason".into(), serde_json::json!(reason));
            e.extra.insert("online".into(), online.clone());
            e.extra.insert("gate".into(), serde_json::json!("serve"));
        };
        self.write(|kv| {
            let old = model_in(kv, &id)?;
            if !old.tags.iter().any(|t| t == "canary") {
                return Err(Error::Conflict(format!(
                    "model {id} is no longer tagged canary (decided elsewhere?)"
                )));
            }
            let mut b = Batch::default();
            let mut ev = EventWriter::sequenced();
            match verdict {
                CanaryVerdict::Promote => {
                    ensure_production_is(kv, &id, production)?;
                    promote_batch_with(
                        kv,
                        &mut b,
                        &mut ev,
                        &id,
                        (!production.is_empty()).then_some(production),
                        |m, e| {
                            m.tags.retain(|t| t != "canary");
                            extra(e);
                        },
                    )?;
                }
                CanaryVerdict::Reject => {
                    let mut m = old.clone();
                    m.tags.retain(|t| t != "canary");
                    if !m.tags.iter().any(|t| t == "rejected") {
                        m.tags.push("rejected".into());
                    }
                    put_model(&mut b, Some(&old), &m);
                    let mut e = model_tag_event(&m, vec!["rejected".into()], Vec::new());
                    extra(&mut e);
                    ev.push(&mut b, e);
                }
            }
            Ok((b, ()))
        })?;
        self.model(&id)
    }

    /// The model events (`model_created`, `model_tagged`) of the line
    /// `project`/`name`, newest first, at most `limit` (the event log read
    /// backwards).
    pub fn model_history(&self, project: &str, name: &str, limit: usize) -> Result<Vec<Event>> {
        let kv = self.store().reader();
        let mut out = Vec::new();
        let mut err = None;
        kv.scan_rev(Cf::App, keys::EVENT, b"", &mut |k, v| {
            if k.len() != keys::EVENT.len() + 8 {
                return Ok(true);
            }
            match crate::events::decode(k, v) {
                Ok(e) => {
                    if matches!(e.kind, EventKind::ModelCreated | EventKind::ModelTagged)
                        && e.project == project
                        && e.name == name
                    {
                        out.push(e);
                    }
                }
                Err(e) => {
                    err = Some(e);
                    return Ok(false);
                }
            }
            Ok(out.len() < limit)
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Adds and removes model tags (one write, one event).
    pub fn tag_model(&self, spec: &str, add: &[String], remove: &[String]) -> Result<Model> {
        let id = self.model(spec)?.id;
        for t in add {
            dsv_store::store::validate_label(t, "tag")?;
        }
        self.write(|kv| {
            let old = model_in(kv, &id)?;
            let mut m = old.clone();
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
            put_model(&mut b, Some(&old), &m);
            let mut ev = EventWriter::sequenced();
            ev.push(&mut b, model_tag_event(&m, added, removed));
            Ok((b, m))
        })
    }
}

/// Puts `t` (stored as `old`, `None` for a new task) on `queue` now: its
/// status, its queue entry and its record in `b`.
pub(crate) fn queue_batch(b: &mut Batch, old: Option<&Task>, t: &mut Task, queue: &str) {
    let now = dsv_store::store::now_ms();
    t.status = TaskStatus::Queued;
    t.queue = Some(queue.to_string());
    t.queued_ms = Some(now);
    t.lease = None;
    b.put(Cf::App, queue_key(queue, now, &t.id), Vec::new());
    put_task(b, old, t);
}

/// Marks `t` running by `agent` from `now_ms`, with a fresh lease.
fn run_here(t: &mut Task, agent: &AgentInfo, ttl_ms: i64, now_ms: i64) -> Result<()> {
    t.status = TaskStatus::Running;
    t.started_ms = Some(now_ms);
    t.heartbeat_ms = Some(now_ms);
    t.agent = Some(agent.clone());
    t.lease = Some(Lease::grant(&agent.id, ttl_ms, now_ms)?);
    Ok(())
}

/// Tasks, newest first, of one project and/or status: through the status
/// index when a status is given, else the project index, else every record.
pub(crate) fn tasks_in(
    kv: &dyn KvRead,
    project: Option<&str>,
    status: Option<TaskStatus>,
) -> Result<Vec<Task>> {
    let keep =
        |t: &Task| project.is_none_or(|p| t.project == p) && status.is_none_or(|s| t.status == s);
    let mut out = match (status, project) {
        (Some(s), _) => {
            let g = keys::index_group(keys::TASK_BY_STATUS, s.as_str());
            records_in(kv, &g, keys::TASK, "task")?
        }
        (None, Some(p)) => {
            let g = keys::index_group(keys::TASK_BY_PROJECT, p);
            records_in(kv, &g, keys::TASK, "task")?
        }
        (None, None) => scan_json(kv, keys::TASK, "task", |_: &Task| true)?,
    };
    out.retain(keep);
    out.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    Ok(out)
}

/// Models, newest first, of one project and/or carrying a tag: through the
/// tag index when a tag is given, else the project index, else every record.
pub(crate) fn models_in(
    kv: &dyn KvRead,
    project: Option<&str>,
    tag: Option<&str>,
) -> Result<Vec<Model>> {
    let mut out: Vec<Model> = match (tag, project) {
        (Some(t), _) => {
            let g = keys::index_group(keys::MODEL_BY_TAG, t);
            records_in(kv, &g, keys::MODEL, "model")?
        }
        (None, Some(p)) => {
            let g = keys::index_group(keys::MODEL_BY_PROJECT, p);
            records_in(kv, &g, keys::MODEL, "model")?
        }
        (None, None) => scan_json(kv, keys::MODEL, "model", |_: &Model| true)?,
    };
    out.retain(|m| {
        project.is_none_or(|p| m.project == p) && tag.is_none_or(|t| m.tags.iter().any(|x| x == t))
    });
    out.sort_by(|a, b| (b.created_ms, &b.id).cmp(&(a.created_ms, &a.id)));
    Ok(out)
}

/// The `model_created` event of `m` (made by its task here, or imported).
fn model_created(m: &Model) -> Event {
    let mut e = Event::new(EventKind::ModelCreated);
    e.project = m.project.clone();
    e.name = m.name.clone();
    e.tags = m.tags.clone();
    e.extra.insert("model".into(), serde_json::json!(m.id));
    e.extra.insert("task".into(), serde_json::json!(m.task));
    e.extra
        .insert("metrics".into(), serde_json::json!(m.metrics));
    e
}

fn model_in(kv: &dyn KvRead, id: &str) -> Result<Model> {
    match kv.get(Cf::App, &model_key(id))? {
        Some(v) => from_json(&v, "model"),
        None => Err(Error::Invalid(format!("no model {id}"))),
    }
}

/// Tags `new` `production` and moves the previous production model (if
/// any) to `previous`, with one model event.
/// Fails with [`Error::Conflict`] unless the production model of `new`'s
/// project (other than `new`) is still `old` (`""`: none) — the model a
/// promotion decision, made outside the write, compared against. Two gates
/// deciding at once: the second decides again instead of replacing a better
/// model promoted meanwhile.
pub(crate) fn ensure_production_is(kv: &dyn KvRead, new: &str, old: &str) -> Result<()> {
    let m = model_in(kv, new)?;
    let now: Vec<String> = models_in(kv, Some(&m.project), Some("production"))?
        .into_iter()
        .filter(|o| o.id != m.id)
        .map(|o| o.id)
        .collect();
    let expected: Vec<String> = if old.is_empty() {
        Vec::new()
    } else {
        vec![old.to_string()]
    };
    if now != expected {
        return Err(Error::Conflict(format!(
            "the production model of project '{}' changed since the promotion decision \
             (now {}, decided against {}); decide again",
            m.project,
            if now.is_empty() {
                "none".to_string()
            } else {
                now.join(", ")
            },
            if old.is_empty() { "none" } else { old }
        )));
    }
    Ok(())
}

pub(crate) fn promote_batch(
    kv: &dyn KvRead,
    b: &mut Batch,
    ev: &mut EventWriter,
    new: &str,
    old: Option<&str>,
) -> Result<()> {
    promote_batch_with(kv, b, ev, new, old, |_, _| {})
}

/// [`promote_batch`], with `adjust` applied to the promoted model and its
/// event before they are written (a canary loses its `canary` tag, the
/// event carries the gate's figures).
pub(crate) fn promote_batch_with(
    kv: &dyn KvRead,
    b: &mut Batch,
    ev: &mut EventWriter,
    new: &str,
    old: Option<&str>,
    adjust: impl FnOnce(&mut Model, &mut Event),
) -> Result<()> {
    let old_new = model_in(kv, new)?;
    let mut m = old_new.clone();
    if !m.tags.iter().any(|t| t == "production") {
        m.tags.push("production".into());
    }
    m.tags.retain(|t| t != "previous");
    let mut e = Event::new(EventKind::ModelTagged);
    e.tags_added = vec!["production".into()];
    adjust(&mut m, &mut e);
    put_model(b, Some(&old_new), &m);
    e.project = m.project.clone();
    e.name = m.name.clone();
    e.tags = m.tags.clone();
    e.extra.insert("model".into(), serde_json::json!(m.id));
    // Every other production model of the project steps down, not only the
    // one the decision saw: two gates deciding at once must not leave two
    // models tagged production.
    let mut others: Vec<Model> = models_in(kv, Some(&m.project), Some("production"))?
        .into_iter()
        .filter(|o| o.id != m.id)
        .collect();
    if let Some(old) = old {
        if old != m.id && !others.iter().any(|o| o.id == old) {
            others.push(model_in(kv, old)?);
        }
    }
    for before in others {
        let mut o = before.clone();
        o.tags.retain(|t| t != "production");
        if !o.tags.iter().any(|t| t == "previous") {
            o.tags.push("previous".into());
        }
        put_model(b, Some(&before), &o);
        if Some(o.id.as_str()) == old || !e.extra.contains_key("previous") {
            e.extra.insert("previous".into(), serde_json::json!(o.id));
        }
    }
    ev.push(b, e);
    Ok(())
}

/// A `model_tagged` event of `m` (its tags after the change).
fn model_tag_event(m: &Model, added: Vec<String>, removed: Vec<String>) -> Event {
    let mut e = Event::new(EventKind::ModelTagged);
    e.project = m.project.clone();
    e.name = m.name.clone();
    e.tags = m.tags.clone();
    e.tags_added = added;
    e.tags_removed = removed;
    e.extra.insert("model".into(), serde_json::json!(m.id));
    e
}

/// Tags model `id` `canary` in `b`, removing the tag from any other model
/// of its line (one canary per line), with one model event; a production
/// model is left alone. Returns what happened, for the firing's note.
pub(crate) fn canary_batch(
    kv: &dyn KvRead,
    b: &mut Batch,
    ev: &mut EventWriter,
    id: &str,
) -> Result<String> {
    let old = model_in(kv, id)?;
    if old.tags.iter().any(|t| t == "production") {
        return Ok("not a canary: the model is already production".into());
    }
    if old.tags.iter().any(|t| t == "canary") {
        return Ok("already the canary".into());
    }
    let mut note = format!("canary: {}", &old.id[..12.min(old.id.len())]);
    for before in models_in(kv, Some(&old.project), Some("canary"))? {
        if before.name != old.name || before.id == old.id {
            continue;
        }
        let mut o = before.clone();
        o.tags.retain(|t| t != "canary");
        put_model(b, Some(&before), &o);
        let mut e = model_tag_event(&o, Vec::new(), vec!["canary".into()]);
        e.extra.insert(
            "reason".into(),
            serde_json::json!(format!("superseded by {}", old.id)),
        );
        ev.push(b, e);
        note.push_str(&format!(" (replaces {})", &o.id[..12.min(o.id.len())]));
    }
    let mut m = old.clone();
    m.tags.push("canary".into());
    put_model(b, Some(&old), &m);
    ev.push(b, model_tag_event(&m, vec!["canary".into()], Vec::new()));
    Ok(note)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_overlap_counts_the_union_within_the_window() {
        assert_eq!(dsv_store::txn::overlap_ms(&[], 0, 100), 0);
        // Inside, partly outside, wholly outside.
        assert_eq!(dsv_store::txn::overlap_ms(&[(10, 20)], 0, 100), 10);
        assert_eq!(dsv_store::txn::overlap_ms(&[(-50, 30)], 0, 100), 30);
        assert_eq!(dsv_store::txn::overlap_ms(&[(90, 500)], 0, 100), 10);
        assert_eq!(
            dsv_store::txn::overlap_ms(&[(200, 300), (-9, -1)], 0, 100),
            0
        );
        // Overlapping and nested intervals count once, in any order.
        assert_eq!(
            dsv_store::txn::overlap_ms(&[(40, 60), (10, 50), (20, 30)], 0, 100),
            50
        );
        assert_eq!(
            dsv_store::txn::overlap_ms(&[(10, 20), (20, 30)], 0, 100),
            20
        );
        assert_eq!(
            dsv_store::txn::overlap_ms(&[(10, 20), (30, 40)], 0, 100),
            20
        );
        // Empty or reversed intervals count nothing.
        assert_eq!(dsv_store::txn::overlap_ms(&[(50, 50), (60, 40)], 0, 100), 0);
    }

    #[test]
    fn a_stall_pushes_the_expiry_back() {
        let mut l = Lease::grant("agent", 30_000, 1_000).unwrap();
        assert_eq!((l.renewed_ms, l.expires_ms), (1_000, 31_000));
        assert!(!l.expired(0, 31_000));
        assert!(l.expired(0, 31_001));
        // A 60 s gc stalled the store since the renewal: the lease lives
        // 60 s longer.
        let stalls = [(5_000, 65_000)];
        let now = 80_000;
        let stalled = dsv_store::txn::overlap_ms(&stalls, l.renewed_ms, now);
        assert_eq!(stalled, 60_000);
        assert!(!l.expired(stalled, now));
        assert!(!l.expired(stalled, 91_000));
        assert!(l.expired(
            dsv_store::txn::overlap_ms(&stalls, l.renewed_ms, 91_001),
            91_001
        ));
        // A stall before the renewal does not count.
        l.renew(70_000);
        assert_eq!(l.expires_ms, 100_000);
        assert_eq!(
            dsv_store::txn::overlap_ms(&stalls, l.renewed_ms, 100_001),
            0
        );
        assert!(l.expired(0, 100_001));
        // A slower clock never moves a renewal back.
        l.renew(69_000);
        assert_eq!((l.renewed_ms, l.expires_ms), (70_000, 100_000));
    }

    #[test]
    fn a_record_without_lease_expires_a_ttl_after_its_heartbeat() {
        let mut t = Task::draft("p", "n", "trainer", None, BTreeMap::new(), None).unwrap();
        assert!(effective_lease(&t, 10).is_none(), "not running");
        t.status = TaskStatus::Running;
        t.started_ms = Some(100);
        let l = effective_lease(&t, 10).unwrap();
        assert_eq!((l.renewed_ms, l.expires_ms), (100, 110));
        t.heartbeat_ms = Some(500);
        let l = effective_lease(&t, 10).unwrap();
        assert_eq!((l.renewed_ms, l.expires_ms, l.ttl_ms), (500, 510, 10));
        assert!(!l.expired(0, 510) && l.expired(0, 511));
    }
}
