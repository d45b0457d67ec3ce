//! The trigger loop: the event log through every trigger.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsv::{Firing, Repo};

use crate::error::Result;
use crate::wake::Wake;

/// Processes the pending events once through every trigger (firings are
/// recorded with the trigger's cursor); the promotion gate evaluates
/// production on the new model's data when needed.
pub fn process(repo: &Repo) -> Result<Vec<Firing>> {
    let eval = crate::gate::evaluator(repo);
    Ok(repo.run_triggers(&eval)?)
}

/// What a trigger loop reports.
pub trait TriggerEvents {
    /// A trigger fired (or deferred, or was skipped: see its kind).
    fn fired(&self, _firing: &Firing) {}
}

/// Reports nothing.
impl TriggerEvents for () {}

/// How a trigger loop runs.
#[derive(Debug, Clone)]
pub struct TriggerOptions {
    /// Process what is pending, then return.
    pub once: bool,
    /// Longest wait between passes when nothing changes.
    pub idle_wait: Duration,
}

impl Default for TriggerOptions {
    fn default() -> Self {
        Self {
            once: false,
            idle_wait: Duration::from_secs(1),
        }
    }
}

/// Fires triggers as events arrive.
pub struct TriggerLoop {
    repo: Arc<Repo>,
    options: TriggerOptions,
}

impl TriggerLoop {
    /// A loop over `repo`.
    pub fn new(repo: Arc<Repo>, options: TriggerOptions) -> TriggerLoop {
        TriggerLoop { repo, options }
    }

    /// Processes events until `stop` is set (or once, with
    /// [`TriggerOptions::once`]); returns every firing.
    pub fn run(&self, stop: &AtomicBool, events: &dyn TriggerEvents) -> Result<Vec<Firing>> {
        let repo = &*self.repo;
        let mut wake = Wake::new(repo, &crate::wake::trigger_keyspaces())?;
        let mut all = Vec::new();
        loop {
            let round = (|| -> Result<Vec<Firing>> {
                repo.store().refresh()?;
                process(repo)
            })();
            match round {
                Ok(fired) => {
                    for f in fired {
                        events.fired(&f);
                        all.push(f);
                    }
                }
                // A busy or briefly unavailable store: wait and go on (a
                // firing is exactly-once through its cursor, so nothing is
                // lost or repeated).
                Err(crate::Error::Repo(e)) if crate::transient(&e) && !self.options.once => {
                    tracing::debug!("trigger loop: {e}; trying again");
                }
                Err(e) => return Err(e),
            }
            if self.options.once || stop.load(Ordering::Acquire) {
                break;
            }
            wake.wait(self.options.idle_wait);
        }
        Ok(all)
    }
}
