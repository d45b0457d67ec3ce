//! Task parameters: the keys the built-in trainer reads, and the one rule
//! applied wherever parameters are defined — `task create`, `task clone
//! --set`, a trigger's clone overrides (`trigger add --set`) — and again by
//! the trainer before it trains.
//!
//! A trainer task accepts only the keys the trainer knows: `General/*`,
//! `Promote/*`, and the `Model/*` hyperparameters of its model
//! (`General/model`, default `logistic`), plus free-form notes under
//! `User/*` (recorded, never read by the trainer). An unknown key is an error that
//! lists the valid ones (and the closest, when one is close): a misspelled
//! hyperparameter must not be recorded as if it had been used. Its features
//! must not include the label (label leakage). A command task accepts any
//! `SECTION/KEY`: the user's program reads them.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// The built-in trainer's models.
pub const MODELS: [&str; 4] = ["logistic", "tree", "forest", "naive_bayes"];

/// `General/*` keys of a trainer task.
pub const GENERAL: [&str; 8] = [
    "dataset_id",
    "test_dataset_id",
    "features",
    "label",
    "model",
    "files",
    "seed",
    "test_fraction",
];

/// The free-form section of a trainer task: notes the trainer never reads.
pub const USER: &str = "User";

/// `Promote/*` keys (the promotion gate of `task create --promote-if-better`).
pub const PROMOTE: [&str; 3] = ["metric", "margin", "lower_is_better"];

const TREE: [&str; 5] = [
    "max_depth",
    "min_samples_split",
    "min_samples_leaf",
    "max_features",
    "criterion",
];

/// The `Model/*` hyperparameters a model reads; `None` for an unknown model.
pub fn model_keys(model: &str) -> Option<Vec<&'static str>> {
    Some(match model {
        "logistic" => vec!["max_iter", "alpha", "tol"],
        "tree" => TREE.to_vec(),
        "forest" => {
            let mut v = TREE.to_vec();
            v.push("n_estimators");
            v
        }
        "naive_bayes" => vec!["var_smoothing"],
        _ => return None,
    })
}

/// Whether a value holds a trigger placeholder (`${…}`): known only when
/// the trigger fires.
fn templated(v: &str) -> bool {
    v.contains("${")
}

/// Checks that `k` is `SECTION/KEY`.
pub fn check_key_form(k: &str) -> Result<()> {
    let ok = k
        .split_once('/')
        .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty());
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "parameter '{k}' must be SECTION/KEY (e.g. General/dataset_id, Model/max_depth)"
        )))
    }
}

/// Edit distance (for "did you mean").
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown(key: &str, what: &str, valid: &[String]) -> Error {
    let lower = key.to_ascii_lowercase();
    let close = valid
        .iter()
        .map(|v| (distance(&lower, &v.to_ascii_lowercase()), v))
        .filter(|(d, _)| *d <= 3)
        .min();
    let hint = close
        .map(|(_, v)| format!("did you mean '{v}'? "))
        .unwrap_or_default();
    Error::Invalid(format!(
        "unknown parameter '{key}' for {what}: {hint}(valid: {})",
        valid.join(", ")
    ))
}

/// Checks a task's parameters against its kind (`trainer` or `command`):
/// see the module documentation. Values holding trigger placeholders are
/// checked when they are known (the trainer checks again before it trains).
pub fn check_task_params(kind: &str, params: &BTreeMap<String, String>) -> Result<()> {
    for k in params.keys() {
        check_key_form(k)?;
    }
    if kind != "trainer" {
        return Ok(());
    }
    let model = params
        .get("General/model")
        .map(|m| m.trim())
        .filter(|m| !m.is_empty())
        .unwrap_or("logistic");
    let model_keys: Vec<&str> = if templated(model) {
        // Any model's hyperparameters until the model is known.
        let mut all: Vec<&str> = MODELS
            .iter()
            .flat_map(|m| model_keys(m).unwrap_or_default())
            .collect();
        all.sort();
        all.dedup();
        all
    } else {
        model_keys(model).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown model '{model}' in General/model (known: {})",
                MODELS.join(", ")
            ))
        })?
    };
    let general: Vec<String> = GENERAL.iter().map(|k| format!("General/{k}")).collect();
    let promote: Vec<String> = PROMOTE.iter().map(|k| format!("Promote/{k}")).collect();
    let hyper: Vec<String> = model_keys.iter().map(|k| format!("Model/{k}")).collect();
    for k in params.keys() {
        let (section, _) = k.split_once('/').expect("checked form");
        let (valid, what) = match section {
            "General" => (&general, "the trainer".to_string()),
            "Promote" => (&promote, "the promotion gate".to_string()),
            "Model" => (&hyper, format!("the {model} model")),
            USER => continue,
            _ => {
                let mut all: Vec<String> = general
                    .iter()
                    .chain(&promote)
                    .chain(&hyper)
                    .cloned()
                    .collect();
                all.push(format!("{USER}/… (free-form notes)"));
                return Err(unknown(k, "a trainer task", &all));
            }
        };
        if !valid.contains(k) {
            return Err(unknown(k, &what, valid));
        }
    }
    check_no_leakage(params)
}

/// Refuses features that include the label: the model would be handed the
/// answer (and score a meaningless accuracy of 1.0).
pub fn check_no_leakage(params: &BTreeMap<String, String>) -> Result<()> {
    let (Some(label), Some(features)) =
        (params.get("General/label"), params.get("General/features"))
    else {
        return Ok(());
    };
    let label = label.trim();
    if templated(label) || templated(features) || label.is_empty() {
        return Ok(());
    }
    if features.split(',').any(|f| f.trim() == label) {
        return Err(Error::Invalid(format!(
            "General/features includes the label column '{label}' (label leakage: the model \
             would be given the answer); remove it from General/features"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn trainer_keys_are_checked_per_model() {
        let ok = p(&[
            ("General/model", "tree"),
            ("General/label", "y"),
            ("Model/max_depth", "3"),
            ("Promote/metric", "test/accuracy"),
        ]);
        check_task_params("trainer", &ok).unwrap();
        let e = check_task_params(
            "trainer",
            &p(&[("General/model", "tree"), ("Model/maxdepth", "3")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'Model/maxdepth'") && e.contains("did you mean 'Model/max_depth'"),
            "{e}"
        );
        assert!(
            e.contains("Model/min_samples_leaf"),
            "lists the valid keys: {e}"
        );
        // A tree hyperparameter on the default (logistic) model.
        let e = check_task_params("trainer", &p(&[("Model/max_depth", "3")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("logistic") && e.contains("Model/max_iter"),
            "{e}"
        );
        let e = check_task_params("trainer", &p(&[("General/labl", "y")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 'General/label'"), "{e}");
        assert!(check_task_params("trainer", &p(&[("Other/x", "1")])).is_err());
        check_task_params("trainer", &p(&[("User/note", "anything")])).unwrap();
        assert!(check_task_params("trainer", &p(&[("General/model", "svm")])).is_err());
        // Command tasks take any SECTION/KEY.
        check_task_params("command", &p(&[("Model/maxdepth", "3"), ("Mine/x", "1")])).unwrap();
        assert!(check_task_params("command", &p(&[("nosection", "1")])).is_err());
    }

    #[test]
    fn features_must_not_include_the_label() {
        let e = check_task_params(
            "trainer",
            &p(&[
                ("General/label", "Occupancy"),
                ("General/features", "Light, Occupancy"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("'Occupancy'") && e.contains("leakage"), "{e}");
        check_task_params(
            "trainer",
            &p(&[
                ("General/label", "Occupancy"),
                ("General/features", "Light,CO2"),
            ]),
        )
        .unwrap();
    }
}
