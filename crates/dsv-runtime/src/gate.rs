//! The promotion gate: a new model replaces `production` only when it beats
//! it on the same evaluation data.

use dsv::{Model, Repo, Task, TaskStatus};

use crate::error::Result;

/// A metric of an evaluation by its name (`test/accuracy` → accuracy).
pub fn metric_of(m: &dsv_train::Metrics, name: &str) -> Option<f64> {
    let k = name.rsplit('/').next().unwrap_or(name);
    Some(match k {
        "accuracy" => m.accuracy,
        "precision" => m.precision,
        "recall" => m.recall,
        "f1" => m.f1,
        "roc_auc" => m.roc_auc,
        "log_loss" => m.log_loss,
        _ => return None,
    })
}

/// Evaluates a stored model on an evaluation version (hex id): `metric`'s
/// value, or `None` when the model or the data cannot be read.
pub fn evaluator(repo: &Repo) -> impl Fn(&Model, &str, &str) -> Option<f64> + '_ {
    move |prod: &Model, ev: &str, metric: &str| -> Option<f64> {
        let body: dsv_train::FittedModel =
            serde_json::from_slice(&repo.model_body(prod).ok()?).ok()?;
        let v = repo.resolve(ev).ok()?;
        let t = dsv_train::load_version(
            repo,
            &v,
            None,
            &dsv_train::Columns {
                features: &body.features,
                label: Some(&body.label),
            },
        )
        .ok()?;
        metric_of(&body.evaluate(&t).ok()?, metric)
    }
}

/// The evaluation gate of `task create --promote-if-better`: when `done`
/// completed with a model and asks for it (`Promote/metric`, with
/// `Promote/margin` and `Promote/lower_is_better`), decides and applies the
/// promotion. Returns the decision's explanation, or `None` when the task
/// asks for no gate.
pub fn promote_if_better(repo: &Repo, done: &Task) -> Result<Option<String>> {
    let (Some(metric), Some(model), TaskStatus::Completed) = (
        done.params.get("Promote/metric"),
        done.models.first(),
        done.status,
    ) else {
        return Ok(None);
    };
    let margin = done
        .params
        .get("Promote/margin")
        .and_then(|m| m.parse().ok())
        .unwrap_or(0.0);
    let lower = done
        .params
        .get("Promote/lower_is_better")
        .is_some_and(|v| v == "true");
    let eval = evaluator(repo);
    // Decided outside the write (evaluation takes time); applied only if
    // production is still what the decision compared against, else decided
    // again (another gate promoted meanwhile).
    let mut tries = 0;
    loop {
        let d = repo.promotion_decision(model, metric, margin, lower, &eval)?;
        match repo.apply_promotion(&d) {
            Err(dsv::Error::Conflict(_)) if tries < 5 => tries += 1,
            Err(e) => return Err(e.into()),
            Ok(_) => return Ok(Some(d.2)),
        }
    }
}
