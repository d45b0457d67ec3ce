//! # dsv-runtime — the worker runtime as a library
//!
//! Everything that *runs* work against a dsv repository, usable from any
//! program (the `dsv` binary is one such program):
//!
//! * [`Agent`]: the agent loop — housekeeping (tasks of dead agents are
//!   reaped, triggers fired when asked), dequeue, run, retry of transient
//!   errors, an idle wait that wakes on any change of the repository;
//! * [`Executor`]: how a task of a kind runs. [`TrainerExecutor`] (the
//!   in-process trainer of `dsv-train`) and [`CommandExecutor`] (the
//!   external-command contract) are registered by default in
//!   [`Executors`]; a program can register its own;
//! * [`execute`]: one started task to its end — the heartbeat (a sign of
//!   life, the log so far, abort requests) on the same opened repository,
//!   result recording, and the promotion gate of `--promote-if-better`;
//! * [`gate`]: the promotion gate's evaluator;
//! * [`TriggerLoop`]: processes the event log through the triggers;
//! * [`Watcher`]: `dataset watch` — finished files of a folder into one
//!   draft, finalized on stop;
//! * [`Wake`]: the one place that waits for a change of the repository.
//!
//! Progress goes through small traits ([`AgentEvents`], [`TriggerEvents`],
//! [`WatchEvents`]) whose methods do nothing by default: the library never
//! prints and never reads the environment (a command task's environment is
//! built explicitly).
//!
//! ```no_run
//! use std::sync::{atomic::AtomicBool, Arc};
//! use dsv_runtime::{Agent, AgentOptions};
//! # fn main() -> Result<(), dsv_runtime::Error> {
//! let repo = Arc::new(dsv::Repo::open(std::path::Path::new(".dsv"), Default::default())?);
//! let agent = Agent::new(repo, AgentOptions { once: true, ..Default::default() })?;
//! let report = agent.run(&AtomicBool::new(false), &())?;
//! println!("ran {} task(s)", report.ran.len());
//! # Ok(()) }
//! ```

pub mod agent;
pub mod command;
pub mod error;
pub mod exec;
pub mod gate;
pub mod trainer;
pub mod triggers;
pub mod view;
pub mod wake;
pub mod watch;

pub use agent::{
    agent_alive, agent_info, hostname, reap, transient, Agent, AgentEvents, AgentOptions,
    AgentReport,
};
pub use command::CommandExecutor;
pub use error::{Error, Result};
pub use exec::{execute, run_task, ExecContext, Executor, Executors, TaskLog};
pub use trainer::TrainerExecutor;
pub use triggers::{process, TriggerEvents, TriggerLoop, TriggerOptions};
pub use wake::Wake;
pub use watch::{WatchEvents, WatchOptions, WatchOutcome, WatchStop, Watcher};

/// The first 12 characters of an id, as messages show it.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
