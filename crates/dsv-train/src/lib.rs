//! # dsv-train — the in-process trainer
//!
//! Reads the CSV files of dataset versions straight from the store (nothing
//! is materialized), fits a classifier — two classes or more (up to
//! [`model::MAX_CLASSES`]): logistic regression (binary, or multinomial
//! softmax), CART decision tree, random forest, Gaussian naive Bayes;
//! logistic regression and naive Bayes from linfa, the trees in `cart` — on
//! standardized features, evaluates it on another version
//! or a seeded hold-out split, and returns metrics, per-step scalars and the
//! fitted model (with its feature names and scaling) for the caller to
//! store. Parameters are the task's `SECTION/KEY` map:
//!
//! | key | meaning |
//! |---|---|
//! | `General/dataset_id` | training version (REV: id, prefix, `PROJECT/NAME[@…]`) |
//! | `General/test_dataset_id` | evaluation version; else `General/test_fraction` (default 0.2) and `General/seed` |
//! | `General/features` | comma list of feature columns (default: every column but the label and dates) |
//! | `General/label` | label column (required) |
//! | `General/model` | `logistic`, `tree`, `forest`, `naive_bayes` |
//! | `General/files` | glob of the files to read (default every `.csv`, `.tsv`, `.txt`) |
//! | `Model/…` | hyperparameters: `max_iter`, `alpha`, `tol` (logistic); `max_depth`, `min_samples_split`, `min_samples_leaf`, `max_features` (trees); `n_estimators` (forest, default 100); `var_smoothing` (naive Bayes) |
//! | `Promote/…` | the promotion gate: `metric`, `margin`, `lower_is_better` |
//! | `User/…` | free-form notes, never read |
//!
//! Any other key is refused before training (`dsv::params`: the same rule
//! as at `task create`), so a misspelled hyperparameter is never recorded
//! as if it had been used; so are features that include the label.
//!
//! Scalars (per step): logistic regression logs `train/log_loss` and
//! `train/accuracy` at iterations 1, 2, 4, … of its solver (exact iterates,
//! refitted; the model is the one fitted once); forests log
//! `train/accuracy` of the ensemble after each tree.
//!
//! Metrics, for `train/` and `test/`: `accuracy`, `precision`, `recall`,
//! `f1`, `roc_auc` (of the positive class; macro averages with more than
//! two classes) and `log_loss` (lower is better).
//!
//! This crate never prints and never reads the environment.

pub mod cart;
pub mod error;
pub mod model;
pub mod table;

use std::collections::BTreeMap;

use dsv::{DatasetVersion, Repo};
use rand::seq::SliceRandom;
use rand::SeedableRng;

pub use error::{Error, Result};
pub use model::{FittedModel, Metrics, MODELS};
pub use table::{Columns, Table};

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The fitted model.
    pub model: FittedModel,
    /// Final metrics, keys like `test/accuracy`, `train/accuracy`.
    pub metrics: BTreeMap<String, f64>,
    /// Confusion matrix on the evaluation data (`[truth][predicted]`).
    pub confusion: Vec<Vec<u64>>,
    /// Series of (name, step, value).
    pub scalars: Vec<(String, u64, f64)>,
    /// Dataset versions read (training first).
    pub inputs: Vec<DatasetVersion>,
}

fn is_table_file(p: &str) -> bool {
    [".csv", ".tsv", ".txt", ".tab"]
        .iter()
        .any(|e| p.to_ascii_lowercase().ends_with(e))
}

/// Reads a version's tabular files (all, or those matching `files`).
pub fn load_version(
    repo: &Repo,
    v: &DatasetVersion,
    files: Option<&str>,
    cols: &Columns<'_>,
) -> Result<Table> {
    let mut t = Table::default();
    let items = repo.files(v, files)?;
    let mut n = 0;
    for f in items
        .iter()
        .filter(|f| files.is_some() || is_table_file(&f.path))
    {
        if f.symlink {
            continue;
        }
        let reader = repo.open_file(v, &f.path)?;
        t.read(
            &f.path,
            std::io::BufReader::with_capacity(1 << 16, reader),
            cols,
        )?;
        n += 1;
    }
    if n == 0 {
        return Err(Error::Data(format!(
            "{} has no {} (an empty dataset?)",
            v.label(),
            files
                .map(|g| format!("file matching '{g}'"))
                .unwrap_or_else(|| "CSV/TSV file".into())
        )));
    }
    if t.rows == 0 {
        return Err(Error::Data(format!("{} has no data rows", v.label())));
    }
    Ok(t)
}

fn get<'a>(p: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    p.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// Trains and evaluates per the task parameters; `log` receives progress lines.
pub fn train(
    repo: &Repo,
    params: &BTreeMap<String, String>,
    log: &mut dyn FnMut(&str),
) -> Result<Outcome> {
    train_until(repo, params, log, &|| false)
}

/// [`train`] that stops with [`Error::Cancelled`] once `cancelled` returns
/// true: it is asked after reading each version, before fitting, between a
/// forest's trees, between the refits of a logistic training curve and
/// before evaluating (one linfa fit runs to its end: on the occupancy data
/// ≈ 0.05 s).
pub fn train_until(
    repo: &Repo,
    params: &BTreeMap<String, String>,
    log: &mut dyn FnMut(&str),
    cancelled: &dyn Fn() -> bool,
) -> Result<Outcome> {
    let check = |stage: &str| {
        if cancelled() {
            Err(Error::Cancelled(stage.to_string()))
        } else {
            Ok(())
        }
    };
    // The rule every definition applied (task create, clone, triggers):
    // unknown keys and label leakage are refused, not trained around.
    dsv::params::check_task_params("trainer", params).map_err(|e| Error::Params(e.to_string()))?;
    let kind = get(params, "General/model").unwrap_or("logistic");
    if !MODELS.contains(&kind) {
        return Err(Error::Params(format!(
            "unknown model '{kind}' in General/model (known: {})",
            MODELS.join(", ")
        )));
    }
    let ds = get(params, "General/dataset_id").ok_or_else(|| {
        Error::Params("General/dataset_id is not set (the training dataset version)".into())
    })?;
    let label = get(params, "General/label")
        .ok_or_else(|| Error::Params("General/label is not set (the label column)".into()))?
        .to_string();
    let features: Vec<String> = get(params, "General/features")
        .map(|f| {
            f.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let files = get(params, "General/files");
    let seed: u64 = match get(params, "General/seed") {
        Some(s) => s
            .parse()
            .map_err(|_| Error::Params(format!("General/seed = '{s}' is not an integer")))?,
        None => 0,
    };
    let hyper: BTreeMap<String, String> = params
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("Model/").map(|k| (k.to_string(), v.clone())))
        .collect();
    let cols = Columns {
        features: &features,
        label: Some(&label),
    };
    let train_v = repo.resolve(ds)?;
    log(&format!(
        "reading {} ({} files)",
        train_v.label(),
        train_v.file_count
    ));
    let mut train = load_version(repo, &train_v, files, &cols)?;
    check("after reading the training data")?;
    let mut inputs = vec![train_v];
    let test = match get(params, "General/test_dataset_id") {
        Some(t) => {
            let tv = repo.resolve(t)?;
            log(&format!("evaluating on {}", tv.label()));
            let cols = Columns {
                features: &train.features,
                label: Some(&label),
            };
            let test = load_version(repo, &tv, files, &cols)?;
            inputs.push(tv);
            test
        }
        None => {
            let frac: f64 = match get(params, "General/test_fraction") {
                Some(f) => f
                    .parse()
                    .ok()
                    .filter(|f: &f64| *f > 0.0 && *f < 1.0)
                    .ok_or_else(|| {
                        Error::Params(format!(
                            "General/test_fraction = '{f}' must be a number between 0 and 1"
                        ))
                    })?,
                None => 0.2,
            };
            let mut idx: Vec<usize> = (0..train.rows).collect();
            idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let n_test = ((train.rows as f64) * frac).round().max(1.0) as usize;
            if n_test >= train.rows {
                return Err(Error::Data(format!(
                    "{} rows are too few to hold out {frac} for evaluation",
                    train.rows
                )));
            }
            let (te, tr) = idx.split_at(n_test);
            log(&format!(
                "hold-out split: {} train rows, {} test rows (seed {seed})",
                tr.len(),
                te.len()
            ));
            let test = train.select(te);
            train = train.select(tr);
            test
        }
    };
    log(&format!(
        "fitting {kind} on {} rows × {} features ({})",
        train.rows,
        train.features.len(),
        train.features.join(", ")
    ));
    let mut scalars = Vec::new();
    check("before fitting")?;
    let model = FittedModel::fit(kind, &label, &train, &hyper, seed, &mut scalars, cancelled)?;
    check("before evaluating")?;
    let on_train = model.evaluate(&train)?;
    let on_test = model.evaluate(&test)?;
    let mut metrics = BTreeMap::new();
    for (prefix, m) in [("train", &on_train), ("test", &on_test)] {
        metrics.insert(format!("{prefix}/accuracy"), m.accuracy);
        metrics.insert(format!("{prefix}/precision"), m.precision);
        metrics.insert(format!("{prefix}/recall"), m.recall);
        metrics.insert(format!("{prefix}/f1"), m.f1);
        if m.roc_auc.is_finite() {
            metrics.insert(format!("{prefix}/roc_auc"), m.roc_auc);
        }
        metrics.insert(format!("{prefix}/log_loss"), m.log_loss);
    }
    metrics.insert("test/rows".into(), on_test.rows as f64);
    log(&format!(
        "test: accuracy {:.4}, precision {:.4}, recall {:.4}, f1 {:.4}, confusion {:?}",
        on_test.accuracy, on_test.precision, on_test.recall, on_test.f1, on_test.confusion
    ));
    Ok(Outcome {
        model,
        metrics,
        confusion: on_test.confusion,
        scalars,
        inputs,
    })
}

/// Applies a model to CSV rows: (predicted label value, score) per row. The
/// score is P(positive class) for a two-class model, P(predicted class) for
/// more classes.
pub fn predict(
    model: &FittedModel,
    name: &str,
    input: impl std::io::Read,
) -> Result<Vec<(f64, f64)>> {
    let mut t = Table::default();
    t.read(
        name,
        input,
        &Columns {
            features: &model.features,
            label: None,
        },
    )?;
    let (probs, pred) = model.scores(&t)?;
    let two = model.classes.len() == 2;
    Ok(pred
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let score = if two { probs[[i, 1]] } else { probs[[i, *c]] };
            (model.classes[*c], score)
        })
        .collect())
}
