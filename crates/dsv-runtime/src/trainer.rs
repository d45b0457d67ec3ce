//! The built-in trainer as an executor.

use std::collections::BTreeMap;

use dsv::{Finish, Task, TaskStatus};

use crate::exec::{ExecContext, Executor};

/// Runs `trainer` tasks in process with `dsv-train`: the model, metrics
/// (with the confusion matrix of a binary label), scalars per step and the
/// dataset versions read.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainerExecutor;

impl Executor for TrainerExecutor {
    fn run(&self, ctx: &ExecContext<'_>, t: &Task) -> Finish {
        let mut lines = |s: &str| ctx.log(s);
        let cancelled = || ctx.aborted();
        match dsv_train::train_until(ctx.repo, &t.params, &mut lines, &cancelled) {
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
                ctx.log(&format!("dsv: {e}"));
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
}
