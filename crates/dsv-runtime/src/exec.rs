//! Running one started task: the [`Executor`] of its kind, the heartbeat,
//! abort, result recording and the promotion gate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsv::{AgentInfo, Finish, Repo, Task, TaskStatus};

use crate::agent::{transient, AgentEvents};
use crate::error::Result;

/// How a task of one kind runs. Implementations turn a started task into a
/// [`Finish`] (status, metrics, model, artifacts, error); they do not write
/// the outcome themselves — [`execute`] records it.
///
/// An executor should return soon after [`ExecContext::aborted`] turns true
/// (an abort request or the agent stopping), with status
/// [`TaskStatus::Aborted`]. A panic fails the task; it does not take the
/// agent down.
pub trait Executor: Send + Sync {
    /// Runs `task` to its end.
    fn run(&self, ctx: &ExecContext<'_>, task: &Task) -> Finish;
}

/// What an executor gets besides the task.
pub struct ExecContext<'a> {
    /// The repository the task runs against (the agent's own handle).
    pub repo: &'a Repo,
    /// The task's console log.
    pub log: &'a TaskLog,
    abort: &'a AtomicBool,
}

impl<'a> ExecContext<'a> {
    /// A context over `repo`, `log` and an abort flag (for running an
    /// executor outside [`execute`], e.g. in a test).
    pub fn new(repo: &'a Repo, log: &'a TaskLog, abort: &'a AtomicBool) -> Self {
        Self { repo, log, abort }
    }
    /// Whether the task is to stop now.
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }
    /// The abort flag itself (for a library that takes one).
    pub fn abort_flag(&self) -> &AtomicBool {
        self.abort
    }
    /// Appends a line to the task's log.
    pub fn log(&self, line: &str) {
        self.log.line(line)
    }
}

/// A running task's log: buffered in memory, stored by the heartbeat and
/// with the result. Cheap to clone (one shared buffer), so pipe readers
/// can each hold one.
#[derive(Clone, Default)]
pub struct TaskLog(Arc<Mutex<String>>);

impl TaskLog {
    /// Appends `s` as a line.
    pub fn line(&self, s: &str) {
        if let Ok(mut b) = self.0.lock() {
            b.push_str(s);
            if !s.ends_with('\n') {
                b.push('\n');
            }
        }
    }
    /// Takes what was logged since the last take.
    pub fn take(&self) -> String {
        self.0
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default()
    }
    /// Puts back text taken but not stored (a heartbeat that failed), ahead
    /// of what was logged since.
    pub fn put_back(&self, s: String) {
        if s.is_empty() {
            return;
        }
        if let Ok(mut b) = self.0.lock() {
            let later = std::mem::take(&mut *b);
            *b = s + &later;
        }
    }
}

/// The executors an agent knows, by task kind.
#[derive(Clone)]
pub struct Executors(BTreeMap<String, Arc<dyn Executor>>);

impl Default for Executors {
    /// `trainer` → [`crate::TrainerExecutor`], `command` →
    /// [`crate::CommandExecutor`].
    fn default() -> Self {
        let mut e = Executors::empty();
        e.register("trainer", crate::TrainerExecutor);
        e.register("command", crate::CommandExecutor);
        e
    }
}

impl Executors {
    /// No executor at all.
    pub fn empty() -> Self {
        Executors(BTreeMap::new())
    }
    /// Runs tasks of `kind` with `executor` (replacing any before).
    pub fn register(&mut self, kind: &str, executor: impl Executor + 'static) -> &mut Self {
        self.0.insert(kind.to_string(), Arc::new(executor));
        self
    }
    /// The executor of `kind`.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Executor>> {
        self.0.get(kind)
    }
    /// The kinds registered.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(|k| k.as_str())
    }
}

/// How often the heartbeat stores the log and looks for an abort request,
/// unless the caller says otherwise.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Starts task `id` here as `agent` and runs it to its end (`dsv task run`).
pub fn run_task(
    repo: &Repo,
    executors: &Executors,
    id: &str,
    agent: &AgentInfo,
    stop: &AtomicBool,
    events: &dyn AgentEvents,
) -> Result<Task> {
    let t = repo.start_task(id, agent)?;
    execute(repo, executors, &t, stop, HEARTBEAT_EVERY, events)
}

/// Runs a started task to its end and records the outcome; then applies the
/// evaluation gate of `--promote-if-better`. While it runs, a heartbeat on
/// the same repository handle stores the log every `heartbeat_every` and
/// turns an abort request (or `stop`) into an abort of the executor.
///
/// Returns the task as recorded — or, when the run was given up on and
/// started again elsewhere meanwhile, as it now is.
pub fn execute(
    repo: &Repo,
    executors: &Executors,
    t: &Task,
    stop: &AtomicBool,
    heartbeat_every: Duration,
    events: &dyn AgentEvents,
) -> Result<Task> {
    let log = TaskLog::default();
    let abort = AtomicBool::new(false);
    log.line(&format!(
        "dsv: running {}/{} ({}) as {}",
        t.project,
        t.name,
        t.kind,
        t.agent.as_ref().map(|a| a.name.as_str()).unwrap_or("?")
    ));
    events.task_started(t);
    let tick = heartbeat_every.clamp(Duration::from_millis(1), Duration::from_millis(100));
    let mut finish = std::thread::scope(|scope| {
        // Dropping `done` (when the executor returns) ends the heartbeat at
        // once.
        let (done, finished) = mpsc::channel::<()>();
        let (log_hb, abort_hb) = (&log, &abort);
        scope.spawn(move || {
            // Heartbeat: a sign of life, the log so far, and abort requests.
            let mut last = std::time::Instant::now();
            while let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(tick) {
                if stop.load(Ordering::Acquire) {
                    abort_hb.store(true, Ordering::Release);
                }
                if last.elapsed() >= heartbeat_every {
                    last = std::time::Instant::now();
                    let text = log_hb.take();
                    // Renews the run's lease (by its run id; by its start
                    // time for a run of an older record without a lease).
                    let beat = match &t.lease {
                        Some(l) => repo
                            .heartbeat_lease(&t.id, &l.run, &text, repo.store().now_ms())
                            .map(|b| b != dsv::Beat::Continue),
                        None => repo.heartbeat_run(&t.id, t.started_ms, &text),
                    };
                    match beat {
                        // Abort requested, or the run lost the task.
                        Ok(true) => abort_hb.store(true, Ordering::Release),
                        Ok(false) => {}
                        // A busy store: the text goes with the next beat.
                        Err(_) => log_hb.put_back(text),
                    }
                }
            }
        });
        let ctx = ExecContext::new(repo, &log, &abort);
        // A panic in a model library must fail the task, not kill the
        // agent with the task left running.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match executors.get(&t.kind) {
                Some(x) => x.run(&ctx, t),
                None => Finish {
                    status: Some(TaskStatus::Failed),
                    error: Some(format!(
                        "this agent has no executor for tasks of kind '{}' (it runs: {})",
                        t.kind,
                        executors.kinds().collect::<Vec<_>>().join(", ")
                    )),
                    ..Default::default()
                },
            }
        }));
        drop(done);
        run.unwrap_or_else(|p| Finish {
            status: Some(TaskStatus::Failed),
            error: Some(format!(
                "the trainer crashed: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into())
            )),
            ..Default::default()
        })
    });
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
    finish.run = t.lease.as_ref().map(|l| l.run.clone());
    // The outcome must not be lost to a busy repository (a long gc holding
    // the write lock past the lock timeout): try again a few times, backing
    // off.
    let mut attempt = 0u32;
    let done = loop {
        match repo.finish_task(&t.id, finish.clone()) {
            Err(e) if transient(&e) && attempt < 5 => {
                attempt += 1;
                events.result_retry(t, &e);
                std::thread::sleep(Duration::from_millis(200 << attempt.min(5)));
            }
            // Given up on and started again elsewhere: not this agent's to
            // record; it goes on with other work.
            Err(dsv::Error::Conflict(why)) => {
                events.result_refused(t, &why);
                return Ok(repo.task(&t.id)?);
            }
            r => break r?,
        }
    };
    if let Some(note) = crate::gate::promote_if_better(repo, &done)? {
        events.promotion(&done, &note);
    }
    Ok(done)
}
