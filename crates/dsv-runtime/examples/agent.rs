//! An agent in a few lines: runs what is queued on a queue, then exits.
//!
//! ```text
//! cargo run -p dsv-runtime --example agent -- PATH/.dsv [QUEUE]
//! ```
//!
//! Besides the built-in executors (trainer, command) it shows how a program
//! swaps in its own: here `command` tasks are only echoed, not run.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use dsv::{Finish, Task, TaskStatus};
use dsv_runtime::{Agent, AgentEvents, AgentOptions, ExecContext, Executor};

/// Pretends to run a command: logs it and completes.
struct DryRun;

impl Executor for DryRun {
    fn run(&self, ctx: &ExecContext<'_>, task: &Task) -> Finish {
        ctx.log(&format!(
            "would run: {}",
            task.command.as_deref().unwrap_or("")
        ));
        Finish {
            status: Some(TaskStatus::Completed),
            ..Default::default()
        }
    }
}

/// Prints each task as it ends.
struct Print;

impl AgentEvents for Print {
    fn task_finished(&self, t: &Task) {
        println!("{} {} {}/{}", t.id, t.status.as_str(), t.project, t.name);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".dsv".into());
    let queue = args.next().unwrap_or_else(|| "default".into());

    let repo = Arc::new(dsv::Repo::open(dir.as_ref(), Default::default())?);
    let mut agent = Agent::new(
        repo,
        AgentOptions {
            queues: vec![queue],
            once: true,
            ..Default::default()
        },
    )?;
    agent.register("command", DryRun);
    let report = agent.run(&AtomicBool::new(false), &Print)?;
    println!("{} ran {} task(s)", report.agent.name, report.ran.len());
    Ok(())
}
