//! The agent loop: housekeeping, dequeue, run, retry, idle wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsv::{AgentInfo, Firing, Repo, Task};

use crate::error::Result;
use crate::exec::{execute, Executors, HEARTBEAT_EVERY};
use crate::wake::Wake;

/// What an agent reports while it works. Every method does nothing by
/// default; a front end implements those it shows.
pub trait AgentEvents {
    /// The agent starts serving `queues`.
    fn serving(&self, _agent: &AgentInfo, _queues: &[String]) {}
    /// A task of a dead agent was failed or requeued (its `error` says why).
    fn reaped(&self, _task: &Task) {}
    /// A transient error (busy repository): the agent waits and tries again.
    fn retrying(&self, _agent: &AgentInfo, _error: &dsv::Error) {}
    /// A trigger fired (agents with [`AgentOptions::triggers`]).
    fn fired(&self, _firing: &Firing) {}
    /// A task starts running here.
    fn task_started(&self, _task: &Task) {}
    /// Recording a task's result met a transient error; it is tried again.
    fn result_retry(&self, _task: &Task, _error: &dsv::Error) {}
    /// The result was refused: the run was given up on and started again
    /// elsewhere meanwhile.
    fn result_refused(&self, _task: &Task, _why: &str) {}
    /// The promotion gate decided (`note` explains).
    fn promotion(&self, _task: &Task, _note: &str) {}
    /// A task ended (as recorded).
    fn task_finished(&self, _task: &Task) {}
}

/// Reports nothing.
impl AgentEvents for () {}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Its name (default `agent-HOST-PID`).
    pub name: Option<String>,
    /// Queues served, oldest task first across them.
    pub queues: Vec<String>,
    /// Run until the queues are empty, then return (transient errors are
    /// then returned, not waited out).
    pub once: bool,
    /// Return after running this many tasks.
    pub max_tasks: Option<usize>,
    /// A running task whose agent sent no heartbeat for this long counts as
    /// orphaned (when the agent's process cannot be checked on this host).
    pub dead_after: Duration,
    /// How long the lease on a task this agent runs lasts without renewal;
    /// the heartbeat renews it at least every third of it.
    pub lease_ttl: Duration,
    /// Requeue orphaned tasks instead of failing them.
    pub requeue_dead: bool,
    /// Also process triggers (the whole retraining loop in one process).
    pub triggers: bool,
    /// Longest idle wait between looks at the queues when nothing changes
    /// (reaping and stop flags are checked this often).
    pub idle_wait: Duration,
    /// How often a running task's heartbeat stores its log and looks for an
    /// abort request.
    pub heartbeat_every: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            name: None,
            queues: vec!["default".into()],
            once: false,
            max_tasks: None,
            dead_after: Duration::from_secs(30),
            lease_ttl: Duration::from_millis(dsv::task::DEFAULT_LEASE_TTL_MS as u64),
            requeue_dead: false,
            triggers: false,
            idle_wait: Duration::from_secs(1),
            heartbeat_every: HEARTBEAT_EVERY,
        }
    }
}

/// What an agent did.
#[derive(Debug, Clone)]
pub struct AgentReport {
    /// Who it was.
    pub agent: AgentInfo,
    /// The tasks it ran, in order.
    pub ran: Vec<String>,
}

/// An agent: runs queued tasks with its [`Executors`].
pub struct Agent {
    repo: Arc<Repo>,
    options: AgentOptions,
    executors: Executors,
    me: AgentInfo,
}

impl Agent {
    /// An agent over `repo` with the default executors.
    pub fn new(repo: Arc<Repo>, options: AgentOptions) -> Result<Agent> {
        let me = agent_info(options.name.clone())?;
        Ok(Agent {
            repo,
            options,
            executors: Executors::default(),
            me,
        })
    }
    /// Runs tasks of `kind` with `executor` (replacing a default one).
    pub fn register(&mut self, kind: &str, executor: impl crate::Executor + 'static) -> &mut Self {
        self.executors.register(kind, executor);
        self
    }
    /// Replaces the whole registry.
    pub fn with_executors(mut self, executors: Executors) -> Agent {
        self.executors = executors;
        self
    }
    /// Who this agent is, as tasks record it.
    pub fn info(&self) -> &AgentInfo {
        &self.me
    }
    /// The repository.
    pub fn repo(&self) -> &Arc<Repo> {
        &self.repo
    }

    /// Runs queued tasks until `stop` is set (a running task is then
    /// aborted), or — with [`AgentOptions::once`] — until the queues are
    /// empty, or [`AgentOptions::max_tasks`] ran.
    pub fn run(&self, stop: &AtomicBool, events: &dyn AgentEvents) -> Result<AgentReport> {
        let repo = &*self.repo;
        let o = &self.options;
        let me = &self.me;
        // Wake on any change of the database (an enqueue by another process).
        let mut wake = Wake::new(repo, &crate::wake::agent_keyspaces())?;
        events.serving(me, &o.queues);
        let mut presence = Presence::new(me, o);
        presence.beat(repo, true);
        let mut ran = Vec::new();
        loop {
            if o.max_tasks.is_some_and(|m| ran.len() >= m) {
                break;
            }
            // A long-running agent outlives a busy repository (a lock
            // timeout while a gc runs) instead of exiting: it waits and
            // tries again.
            let housekeeping = (|| -> Result<(), dsv::Error> {
                repo.store().refresh()?;
                let reaped = reap(repo, o.requeue_dead, o.dead_after)?;
                for t in reaped {
                    events.reaped(&t);
                }
                Ok(())
            })();
            match housekeeping {
                Err(e) if transient(&e) && !o.once => {
                    events.retrying(me, &e);
                    wake.wait(o.idle_wait);
                    continue;
                }
                r => r?,
            }
            if stop.load(Ordering::Acquire) {
                break;
            }
            presence.beat(repo, false);
            if o.triggers {
                match crate::triggers::process(repo) {
                    Ok(fired) => {
                        for f in fired {
                            events.fired(&f);
                        }
                    }
                    Err(crate::Error::Repo(e)) if transient(&e) && !o.once => {
                        events.retrying(me, &e);
                        wake.wait(o.idle_wait);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let ttl_ms = o.lease_ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
            let next = match repo.dequeue_at(&o.queues, me, ttl_ms, repo.store().now_ms()) {
                Err(e) if transient(&e) && !o.once => {
                    events.retrying(me, &e);
                    wake.wait(o.idle_wait);
                    continue;
                }
                r => r?,
            };
            match next {
                Some(t) => {
                    let every = o.heartbeat_every.min(Duration::from_millis(
                        dsv::task::renew_every_ms(ttl_ms).max(1) as u64,
                    ));
                    presence.set(repo, dsv::agents::AgentState::Running, Some(t.id.clone()));
                    let done = execute(repo, &self.executors, &t, stop, every, events)?;
                    presence.set(repo, dsv::agents::AgentState::Idle, None);
                    events.task_finished(&done);
                    ran.push(done.id);
                    wake.drain();
                }
                None if o.once => break,
                // Block until the database changes (or the idle bound
                // passes, for heartbeats of dead agents and the stop flag).
                None => wake.wait(o.idle_wait),
            }
        }
        presence.set(repo, dsv::agents::AgentState::Stopped, None);
        Ok(AgentReport {
            agent: me.clone(),
            ran,
        })
    }
}

/// Longest time between two presence records of an idle agent.
const PRESENCE_EVERY: Duration = Duration::from_secs(10);

/// This agent's presence record and when it was last written.
struct Presence {
    rec: dsv::agents::AgentPresence,
    written: Option<std::time::Instant>,
}

impl Presence {
    fn new(me: &AgentInfo, o: &AgentOptions) -> Self {
        let now = dsv_store::store::now_ms();
        Presence {
            rec: dsv::agents::AgentPresence {
                agent: me.clone(),
                queues: o.queues.clone(),
                triggers: o.triggers,
                state: dsv::agents::AgentState::Idle,
                task: None,
                started_ms: now,
                beat_ms: now,
                beat_every_ms: PRESENCE_EVERY.max(o.idle_wait).as_millis() as i64,
            },
            written: None,
        }
    }

    /// Writes the record when `force`d or due. A failure is only logged:
    /// the record is informational, the leases decide.
    fn beat(&mut self, repo: &Repo, force: bool) {
        if !force && self.written.is_some_and(|w| w.elapsed() < PRESENCE_EVERY) {
            return;
        }
        self.rec.beat_ms = repo.store().now_ms();
        match repo.agent_beat(&self.rec, self.written.is_none()) {
            Ok(()) => self.written = Some(std::time::Instant::now()),
            Err(e) => tracing::warn!("cannot record this agent's presence: {e}"),
        }
    }

    fn set(&mut self, repo: &Repo, state: dsv::agents::AgentState, task: Option<String>) {
        self.rec.state = state;
        self.rec.task = task;
        self.beat(repo, true);
    }
}

/// A failure that waiting cures: a retryable store error (the write lock
/// busy past its timeout, a gc between reading and writing, a transaction
/// that kept conflicting, an unavailable backend).
pub fn transient(e: &dsv::Error) -> bool {
    matches!(
        e,
        dsv::Error::Store(s) if s.is_retryable()
    )
}

/// This host's name (`localhost` when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// This process as an agent named `name` (default `agent-HOST-PID`).
pub fn agent_info(name: Option<String>) -> Result<AgentInfo> {
    let host = hostname();
    let pid = std::process::id();
    let name = name.unwrap_or_else(|| format!("agent-{host}-{pid}"));
    Ok(AgentInfo::new(name, host, pid)?)
}

/// The short name (`comm`) of process `pid`.
fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

/// Fails (or with `requeue`, requeues) the running tasks whose lease
/// expired, using the same-host pid check to reap provably dead agents'
/// tasks earlier; `dead_after` judges records written before leases. What
/// every agent's housekeeping and `dsv task reap` do.
pub fn reap(repo: &Repo, requeue: bool, dead_after: Duration) -> Result<Vec<Task>, dsv::Error> {
    repo.reap_dead_tasks(
        &agent_alive,
        dead_after.as_millis().min(i64::MAX as u128) as i64,
        requeue,
    )
}

/// Whether an agent process lives — only knowable on this host (`None`
/// elsewhere): `Some(false)` only when it provably ended (no such process,
/// or a zombie). A live process with that pid counts as alive when it is
/// `dsv` or this very program, and as unknown (`None`: its lease decides)
/// otherwise — an agent embedded in another program looks like that, and
/// so does a reused pid, which the lease then recovers.
pub fn agent_alive(a: &AgentInfo) -> Option<bool> {
    if a.host != hostname() {
        return None;
    }
    match std::fs::read_to_string(format!("/proc/{}/stat", a.pid)) {
        Ok(s) => {
            let zombie = s
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            if zombie {
                return Some(false);
            }
            match comm(a.pid) {
                Some(c) if c == "dsv" || Some(&c) == comm(std::process::id()).as_ref() => {
                    Some(true)
                }
                _ => None,
            }
        }
        Err(_) => Some(false),
    }
}
