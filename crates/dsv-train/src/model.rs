//! Models (linfa and our CART), their serialized form, and classification
//! metrics (two classes: of the positive class; more: macro averages).

use std::collections::BTreeMap;

use linfa::prelude::*;
use linfa_bayes::{GaussianNb, NaiveBayes};
use linfa_logistic::{
    FittedLogisticRegression, LogisticRegression, MultiFittedLogisticRegression,
    MultiLogisticRegression,
};
use ndarray::{Array1, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cart::{Node, TreeParams};
use crate::error::{Error, Result};
use crate::table::Table;

/// Model names the trainer knows.
pub const MODELS: [&str; 4] = dsv::params::MODELS;

/// The fitted estimator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Body {
    /// Logistic regression (two classes).
    Logistic(FittedLogisticRegression<f64, usize>),
    /// Multinomial (softmax) logistic regression (more than two classes).
    MultiLogistic(MultiFittedLogisticRegression<f64, usize>),
    /// One CART decision tree.
    Tree(Node),
    /// A random forest: bootstrap samples, random feature subsets per split.
    Forest(Vec<Node>),
    /// Gaussian naive Bayes.
    NaiveBayes(GaussianNb<f64, usize>),
}

/// A fitted model with everything needed to apply it to new rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FittedModel {
    /// `logistic`, `tree`, `forest` or `naive_bayes`.
    pub kind: String,
    /// Feature columns, in order.
    pub features: Vec<String>,
    /// Label column.
    pub label: String,
    /// The label values in increasing order; class `i` is `classes[i]`.
    /// With two classes, `classes[1]` is the positive class.
    pub classes: Vec<f64>,
    /// Standardization: per-feature mean.
    pub mean: Vec<f64>,
    /// Standardization: per-feature standard deviation (1 where constant).
    pub std: Vec<f64>,
    /// Hyperparameters used.
    pub hyper: BTreeMap<String, String>,
    /// The estimator.
    pub body: Body,
}

/// Classification metrics. With two classes precision, recall, F1 and ROC
/// AUC are the positive class's; with more they are macro averages over
/// the classes (AUC: one class against the rest, over classes present in
/// the truth), as scikit-learn's `average="macro"` / `multi_class="ovr"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Fraction correct.
    pub accuracy: f64,
    /// tp / (tp + fp).
    pub precision: f64,
    /// tp / (tp + fn).
    pub recall: f64,
    /// Harmonic mean of precision and recall (macro: mean of per-class F1).
    pub f1: f64,
    /// Area under the ROC curve of the class scores (NaN when undefined).
    pub roc_auc: f64,
    /// Cross-entropy: mean of −ln P(true class), probabilities clipped to
    /// [1e-15, 1] (lower is better; hard-voting models pay for certainty).
    #[serde(default)]
    pub log_loss: f64,
    /// `confusion[truth][predicted]`; two classes: [[tn, fp], [fn, tp]].
    pub confusion: Vec<Vec<u64>>,
    /// Rows evaluated.
    pub rows: u64,
}

fn hyper<T: std::str::FromStr>(h: &BTreeMap<String, String>, key: &str, default: T) -> Result<T> {
    match h.get(key) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| Error::Params(format!("Model/{key} = '{v}' is not a valid value"))),
    }
}

fn standardize(x: &mut Array2<f64>, mean: &[f64], std: &[f64]) {
    for mut row in x.axis_iter_mut(Axis(0)) {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v - mean[j]) / std[j];
        }
    }
}

/// Most classes a label may have: more distinct values than this is a
/// continuous target, which these classifiers cannot fit.
pub const MAX_CLASSES: usize = 256;

/// Fits logistic regression (binary for two classes, multinomial for more)
/// with the `Model/…` hyperparameters; `iterations` overrides `max_iter`.
fn logistic(
    ds: &DatasetBase<Array2<f64>, Array1<usize>>,
    h: &BTreeMap<String, String>,
    k: usize,
    iterations: Option<u64>,
) -> Result<Body> {
    let max_iter = match iterations {
        Some(n) => n,
        None => hyper(h, "max_iter", 1000u64)?,
    };
    let (alpha, tol) = (hyper(h, "alpha", 1.0f64)?, hyper(h, "tol", 1e-6f64)?);
    let fit_err = |e: linfa_logistic::error::Error| Error::Fit(e.to_string());
    Ok(if k == 2 {
        Body::Logistic(
            LogisticRegression::default()
                .max_iterations(max_iter)
                .alpha(alpha)
                .gradient_tolerance(tol)
                .fit(ds)
                .map_err(fit_err)?,
        )
    } else {
        Body::MultiLogistic(
            MultiLogisticRegression::default()
                .max_iterations(max_iter)
                .alpha(alpha)
                .gradient_tolerance(tol)
                .fit(ds)
                .map_err(fit_err)?,
        )
    })
}

impl Body {
    /// Whether two logistic models have exactly the same weights.
    fn same_weights(&self, other: &Body) -> bool {
        match (self, other) {
            (Body::Logistic(a), Body::Logistic(b)) => {
                a.params() == b.params() && a.intercept() == b.intercept()
            }
            (Body::MultiLogistic(a), Body::MultiLogistic(b)) => {
                a.params() == b.params() && a.intercept() == b.intercept()
            }
            _ => false,
        }
    }
}

/// Maps labels to class indices `0..k` in increasing label order.
fn classes_of(t: &Table, label: &str) -> Result<(Vec<f64>, Array1<usize>)> {
    // `+ 0.0` folds -0 into 0: one class, as `==` (dedup) sees it.
    let mut vals: Vec<f64> = t.y.iter().map(|v| v + 0.0).collect();
    vals.sort_by(|a, b| a.total_cmp(b));
    vals.dedup();
    match vals.len() {
        0 => Err(Error::Data("the training data has no rows".into())),
        1 => Err(Error::Data(format!(
            "label '{label}' has one class only ({}) in the training data; a classifier needs two",
            vals[0]
        ))),
        n if n > MAX_CLASSES => Err(Error::Data(format!(
            "label '{label}' has {n} distinct values (at most {MAX_CLASSES} classes): \
             it looks continuous, and the built-in trainer does classification"
        ))),
        _ => {
            let y =
                t.y.iter()
                    .map(|v| class_index(&vals, *v).expect("a value of the column"))
                    .collect();
            Ok((vals, y))
        }
    }
}

fn class_index(classes: &[f64], v: f64) -> Option<usize> {
    let v = v + 0.0;
    classes.binary_search_by(|c| c.total_cmp(&v)).ok()
}

impl FittedModel {
    /// Fits `kind` on `train` with hyperparameters `hyper` (`Model/…` keys
    /// without the section). Returns the model and per-step scalars.
    pub fn fit(
        kind: &str,
        label: &str,
        train: &Table,
        hyper_in: &BTreeMap<String, String>,
        seed: u64,
        scalars: &mut Vec<(String, u64, f64)>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<FittedModel> {
        if train.rows == 0 {
            return Err(Error::Data("the training data has no rows".into()));
        }
        if train.features.is_empty() {
            return Err(Error::Data("no feature columns".into()));
        }
        let (classes, y) = classes_of(train, label)?;
        let k = classes.len();
        let mut x = train.matrix();
        let mean: Vec<f64> = x.mean_axis(Axis(0)).expect("rows").to_vec();
        let std: Vec<f64> = x
            .std_axis(Axis(0), 0.0)
            .iter()
            .map(|s| if *s > 1e-12 { *s } else { 1.0 })
            .collect();
        standardize(&mut x, &mean, &std);
        let ds = Dataset::new(x.clone(), y.clone());
        let h = hyper_in;
        let tree_params = |default_features: usize| -> Result<TreeParams> {
            if let Some(c) = h.get("criterion") {
                if c != "gini" {
                    return Err(Error::Params(format!(
                        "Model/criterion = '{c}': the trees use gini"
                    )));
                }
            }
            Ok(TreeParams {
                max_depth: hyper(h, "max_depth", 0)?,
                min_samples_split: hyper(h, "min_samples_split", 2)?,
                min_samples_leaf: hyper(h, "min_samples_leaf", 1)?,
                max_features: hyper(h, "max_features", default_features)?,
            })
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let body = match kind {
            "logistic" => logistic(&ds, h, k, None)?,
            "tree" => {
                let tp = tree_params(train.features.len())?;
                let mut idx: Vec<usize> = (0..train.rows).collect();
                Body::Tree(Node::fit(
                    &x,
                    y.as_slice().expect("contiguous"),
                    k,
                    &mut idx,
                    &tp,
                    &mut rng,
                ))
            }
            "naive_bayes" => Body::NaiveBayes(
                GaussianNb::params()
                    .var_smoothing(hyper(h, "var_smoothing", 1e-9f64)?)
                    .fit(&ds)
                    .map_err(|e| Error::Fit(e.to_string()))?,
            ),
            "forest" => {
                let n_trees: usize = hyper(h, "n_estimators", 100)?;
                if n_trees == 0 {
                    return Err(Error::Params(
                        "Model/n_estimators must be at least 1".into(),
                    ));
                }
                let nf = train.features.len();
                let tp = tree_params(((nf as f64).sqrt().round() as usize).max(1))?;
                let ys = y.as_slice().expect("contiguous");
                let mut trees = Vec::with_capacity(n_trees);
                let mut votes = Array2::<f64>::zeros((train.rows, k));
                for t in 0..n_trees {
                    if cancelled() {
                        return Err(Error::Cancelled(format!("after {t} of {n_trees} trees")));
                    }
                    let mut rows: Vec<usize> = (0..train.rows)
                        .map(|_| rng.gen_range(0..train.rows))
                        .collect();
                    let tree = Node::fit(&x, ys, k, &mut rows, &tp, &mut rng);
                    let mut correct = 0u64;
                    for (i, mut v) in votes.rows_mut().into_iter().enumerate() {
                        tree.add_probs(x.row(i), v.as_slice_mut().expect("row-major"));
                        let ens = decide(v.view(), (t + 1) as f64);
                        correct += u64::from(ens == ys[i]);
                    }
                    scalars.push((
                        "train/accuracy".into(),
                        (t + 1) as u64,
                        correct as f64 / train.rows as f64,
                    ));
                    trees.push(tree);
                }
                Body::Forest(trees)
            }
            other => {
                return Err(Error::Params(format!(
                    "unknown model '{other}' (known: {})",
                    MODELS.join(", ")
                )))
            }
        };
        let model = FittedModel {
            kind: kind.to_string(),
            features: train.features.clone(),
            label: label.to_string(),
            classes,
            mean,
            std,
            hyper: hyper_in.clone(),
            body,
        };
        if kind == "logistic" {
            model.logistic_curve(&ds, train, scalars, cancelled)?;
        }
        Ok(model)
    }

    /// The training curve of a logistic fit. The solver (L-BFGS from zero
    /// weights) is deterministic, so a refit capped at `n` iterations is the
    /// `n`-th iterate of the run that produced this model: refits at n = 1,
    /// 2, 4, … until the iterate is the final model (or `max_iter`) give
    /// `train/log_loss` and `train/accuracy` per step, and the model itself
    /// stays the one fitted once. Costs about as much as the fit again.
    fn logistic_curve(
        &self,
        ds: &DatasetBase<Array2<f64>, Array1<usize>>,
        train: &Table,
        scalars: &mut Vec<(String, u64, f64)>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        let max_iter: u64 = hyper(&self.hyper, "max_iter", 1000)?;
        let mut record = |m: &FittedModel, step: u64| -> Result<()> {
            let e = m.evaluate(train)?;
            scalars.push(("train/log_loss".into(), step, e.log_loss));
            scalars.push(("train/accuracy".into(), step, e.accuracy));
            Ok(())
        };
        let mut n = 1u64;
        while n < max_iter {
            if cancelled() {
                return Err(Error::Cancelled(format!("after {n} logistic iterations")));
            }
            let body = logistic(ds, &self.hyper, self.classes.len(), Some(n))?;
            if body.same_weights(&self.body) {
                break;
            }
            let at_n = FittedModel {
                body,
                ..self.clone()
            };
            record(&at_n, n)?;
            n *= 2;
        }
        record(self, n.min(max_iter))
    }

    /// Class probabilities (rows × classes) and predicted class indices of
    /// `t`'s rows.
    pub fn scores(&self, t: &Table) -> Result<(Array2<f64>, Vec<usize>)> {
        if t.features != self.features {
            return Err(Error::Data(format!(
                "the model needs features {:?}, the data has {:?}",
                self.features, t.features
            )));
        }
        let k = self.classes.len();
        let mut x = t.matrix();
        standardize(&mut x, &self.mean, &self.std);
        let mut probs = Array2::<f64>::zeros((t.rows, k));
        let pred: Vec<usize> = match &self.body {
            Body::Logistic(m) => {
                // linfa gives P(its "positive" class); make it P(class 1).
                let flip = m.labels().pos.class != 1;
                for (i, v) in m.predict_probabilities(&x).iter().enumerate() {
                    let p1 = if flip { 1.0 - v } else { *v };
                    probs[[i, 0]] = 1.0 - p1;
                    probs[[i, 1]] = p1;
                }
                let c: Array1<usize> = m.predict(&x);
                c.to_vec()
            }
            Body::MultiLogistic(m) => {
                let p = m.predict_probabilities(&x);
                for (j, c) in m.classes().iter().enumerate() {
                    probs.column_mut(*c).assign(&p.column(j));
                }
                probs.rows().into_iter().map(|r| decide(r, 1.0)).collect()
            }
            Body::Tree(m) => {
                for (i, mut row) in probs.rows_mut().into_iter().enumerate() {
                    m.add_probs(x.row(i), row.as_slice_mut().expect("row-major"));
                }
                probs.rows().into_iter().map(|r| decide(r, 1.0)).collect()
            }
            Body::NaiveBayes(m) => {
                let (p, classes) = m.predict_proba(x.view());
                for (j, c) in classes.iter().enumerate() {
                    probs.column_mut(**c).assign(&p.column(j));
                }
                let c: Array1<usize> = m.predict(&x);
                c.to_vec()
            }
            Body::Forest(trees) => {
                for (i, mut row) in probs.rows_mut().into_iter().enumerate() {
                    let out = row.as_slice_mut().expect("row-major");
                    for t in trees {
                        t.add_probs(x.row(i), out);
                    }
                }
                let n = trees.len() as f64;
                probs.mapv_inplace(|v| v / n);
                probs.rows().into_iter().map(|r| decide(r, 1.0)).collect()
            }
        };
        Ok((probs, pred))
    }

    /// Metrics on a labeled table.
    pub fn evaluate(&self, t: &Table) -> Result<Metrics> {
        if t.rows == 0 {
            return Err(Error::Data("the evaluation data has no rows".into()));
        }
        let (probs, pred) = self.scores(t)?;
        let truth: Vec<usize> =
            t.y.iter()
                .map(|v| {
                    class_index(&self.classes, *v).ok_or_else(|| {
                        Error::Data(format!(
                            "label value {v} in the evaluation data was not seen in training (classes {:?})",
                            self.classes
                        ))
                    })
                })
                .collect::<Result<_>>()?;
        Ok(metrics(&truth, &pred, probs.view()))
    }
}

/// The predicted class of summed class scores over `n` votes: two classes
/// → class 1 when its mean exceeds 0.5; more → the highest (lowest index on
/// a tie).
fn decide(votes: ndarray::ArrayView1<'_, f64>, n: f64) -> usize {
    if votes.len() == 2 {
        return usize::from(votes[1] / n > 0.5);
    }
    let mut best = 0;
    for (c, v) in votes.iter().enumerate() {
        if *v > votes[best] {
            best = c;
        }
    }
    best
}

/// Metrics from truth, predictions and class probabilities (rows × k).
pub fn metrics(truth: &[usize], pred: &[usize], probs: ndarray::ArrayView2<'_, f64>) -> Metrics {
    let k = probs.ncols().max(2);
    let mut c = vec![vec![0u64; k]; k];
    for (t, p) in truth.iter().zip(pred) {
        c[*t][*p] += 1;
    }
    let n = truth.len() as f64;
    let correct: u64 = (0..k).map(|i| c[i][i]).sum();
    // Per class: (precision, recall, f1, present in truth or predictions).
    let per_class = |i: usize| {
        let tp = c[i][i] as f64;
        let predicted: u64 = (0..k).map(|t| c[t][i]).sum();
        let actual: u64 = c[i].iter().sum();
        let precision = if predicted > 0 {
            tp / predicted as f64
        } else {
            0.0
        };
        let recall = if actual > 0 { tp / actual as f64 } else { 0.0 };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        (precision, recall, f1, predicted + actual > 0)
    };
    let (precision, recall, f1, roc_auc) = if k == 2 {
        let (p, r, f, _) = per_class(1);
        let scores: Vec<f64> = probs.column(1).to_vec();
        (p, r, f, roc_auc(truth, &scores))
    } else {
        let present: Vec<(f64, f64, f64)> = (0..k)
            .map(per_class)
            .filter(|m| m.3)
            .map(|m| (m.0, m.1, m.2))
            .collect();
        let m = present.len().max(1) as f64;
        let aucs: Vec<f64> = (0..k)
            .map(|i| {
                let t: Vec<usize> = truth.iter().map(|t| usize::from(*t == i)).collect();
                roc_auc(&t, &probs.column(i).to_vec())
            })
            .filter(|a| a.is_finite())
            .collect();
        (
            present.iter().map(|x| x.0).sum::<f64>() / m,
            present.iter().map(|x| x.1).sum::<f64>() / m,
            present.iter().map(|x| x.2).sum::<f64>() / m,
            if aucs.is_empty() {
                f64::NAN
            } else {
                aucs.iter().sum::<f64>() / aucs.len() as f64
            },
        )
    };
    let log_loss = truth
        .iter()
        .enumerate()
        .map(|(i, t)| -probs[[i, *t]].clamp(1e-15, 1.0).ln())
        .sum::<f64>()
        / n;
    Metrics {
        accuracy: correct as f64 / n,
        precision,
        recall,
        f1,
        roc_auc,
        log_loss,
        confusion: c,
        rows: truth.len() as u64,
    }
}

/// Mann–Whitney AUC with ties counted half.
pub fn roc_auc(truth: &[usize], scores: &[f64]) -> f64 {
    let mut idx: Vec<usize> = (0..truth.len()).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    let (mut pos, mut neg) = (0f64, 0f64);
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            if truth[*k] == 1 {
                rank_sum += avg;
                pos += 1.0;
            } else {
                neg += 1.0;
            }
        }
        i = j + 1;
    }
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fits with default hyperparameters, never cancelled, scalars dropped.
    fn fit(kind: &str, label: &str, t: &Table) -> Result<FittedModel> {
        FittedModel::fit(
            kind,
            label,
            t,
            &BTreeMap::new(),
            7,
            &mut Vec::new(),
            &|| false,
        )
    }

    #[test]
    fn metrics_of_a_known_confusion() {
        let truth = [1, 1, 1, 0, 0, 0, 0, 1];
        let pred = [1, 1, 0, 0, 0, 1, 0, 1];
        let p1 = [0.9, 0.8, 0.4, 0.1, 0.2, 0.6, 0.3, 0.7];
        let probs =
            Array2::from_shape_fn((8, 2), |(i, c)| if c == 1 { p1[i] } else { 1.0 - p1[i] });
        let m = metrics(&truth, &pred, probs.view());
        assert_eq!(m.confusion, vec![vec![3, 1], vec![1, 3]]);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        assert!((m.precision - 0.75).abs() < 1e-12);
        assert!((m.recall - 0.75).abs() < 1e-12);
        // Scores rank positives above negatives except (0.4 < 0.6).
        assert!((m.roc_auc - 15.0 / 16.0).abs() < 1e-12, "{}", m.roc_auc);
    }

    #[test]
    fn macro_metrics_of_a_known_three_class_confusion() {
        // truth 0: predicted 0,0,1; truth 1: 1,1; truth 2: 2,0,2,2.
        let truth = [0, 0, 0, 1, 1, 2, 2, 2, 2];
        let pred = [0, 0, 1, 1, 1, 2, 0, 2, 2];
        // Probabilities that rank every class's rows first: AUC 1 for each.
        let probs = Array2::from_shape_fn((9, 3), |(i, c)| if truth[i] == c { 0.8 } else { 0.1 });
        let m = metrics(&truth, &pred, probs.view());
        assert_eq!(
            m.confusion,
            vec![vec![2, 1, 0], vec![0, 2, 0], vec![1, 0, 3]]
        );
        assert!((m.accuracy - 7.0 / 9.0).abs() < 1e-12);
        // Per class precision 2/3, 2/3, 1; recall 2/3, 1, 3/4.
        let p = (2.0 / 3.0 + 2.0 / 3.0 + 1.0) / 3.0;
        let r = (2.0 / 3.0 + 1.0 + 0.75) / 3.0;
        let f = |p: f64, r: f64| 2.0 * p * r / (p + r);
        let f1 = (f(2.0 / 3.0, 2.0 / 3.0) + f(2.0 / 3.0, 1.0) + f(1.0, 0.75)) / 3.0;
        assert!((m.precision - p).abs() < 1e-12, "{}", m.precision);
        assert!((m.recall - r).abs() < 1e-12, "{}", m.recall);
        assert!((m.f1 - f1).abs() < 1e-12, "{}", m.f1);
        assert!((m.roc_auc - 1.0).abs() < 1e-12, "{}", m.roc_auc);
        // Every row gives its true class 0.8.
        assert!((m.log_loss + 0.8f64.ln()).abs() < 1e-12, "{}", m.log_loss);
    }

    /// Three separable clusters with labels 2, 5 and 7 (not 0..k).
    fn clusters(n: usize, seed: u64) -> Table {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut t = Table {
            features: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        for i in 0..n {
            let c = i % 3;
            t.x.push(3.0 * c as f64 + rng.gen_range(-1.0..1.0));
            t.x.push(-3.0 * c as f64 + rng.gen_range(-1.0..1.0));
            t.y.push([2.0, 5.0, 7.0][c]);
            t.rows += 1;
        }
        t
    }

    #[test]
    fn every_model_fits_more_than_two_classes() {
        let (train, test) = (clusters(300, 1), clusters(150, 2));
        for kind in MODELS {
            let mut scalars = Vec::new();
            let m = FittedModel::fit(
                kind,
                "y",
                &train,
                &BTreeMap::new(),
                7,
                &mut scalars,
                &|| false,
            )
            .unwrap();
            assert_eq!(m.classes, vec![2.0, 5.0, 7.0]);
            let e = m.evaluate(&test).unwrap();
            assert!(e.accuracy > 0.97, "{kind}: {e:?}");
            assert!(e.roc_auc > 0.97, "{kind}: {e:?}");
            assert_eq!(e.confusion.len(), 3);
            assert_eq!(e.confusion.iter().flatten().sum::<u64>(), 150);
            let (probs, pred) = m.scores(&test).unwrap();
            for (row, p) in probs.rows().into_iter().zip(&pred) {
                assert!(
                    (row.sum() - 1.0).abs() < 1e-6,
                    "{kind}: probabilities sum to 1"
                );
                assert!(*p < 3);
            }
            // A model survives its stored form (JSON) unchanged.
            let back: FittedModel =
                serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
            assert_eq!(back.scores(&test).unwrap().1, pred, "{kind}");
        }
        let mut unseen = clusters(3, 3);
        unseen.y[0] = 9.0;
        let m = fit("tree", "y", &train).unwrap();
        let e = m.evaluate(&unseen).unwrap_err().to_string();
        assert!(
            e.contains("label value 9") && e.contains("not seen in training"),
            "{e}"
        );
    }

    #[test]
    fn logistic_fits_log_their_training_curve() {
        for t in [clusters(300, 5), {
            let mut t = clusters(300, 5);
            t.y.iter_mut().for_each(|y| *y = f64::from(*y > 4.0));
            t
        }] {
            let mut scalars = Vec::new();
            let m = FittedModel::fit(
                "logistic",
                "y",
                &t,
                &BTreeMap::new(),
                7,
                &mut scalars,
                &|| false,
            )
            .unwrap();
            let curve: Vec<(u64, f64)> = scalars
                .iter()
                .filter(|s| s.0 == "train/log_loss")
                .map(|s| (s.1, s.2))
                .collect();
            assert!(curve.len() >= 2, "{curve:?}");
            let steps: Vec<u64> = curve.iter().map(|c| c.0).collect();
            let doubling: Vec<u64> = (0..steps.len()).map(|i| 1 << i).collect();
            assert_eq!(steps, doubling, "iterates 1, 2, 4, …");
            let last = curve.last().unwrap().1;
            assert!(curve[0].1 > last, "training lowers the loss: {curve:?}");
            let e = m.evaluate(&t).unwrap();
            assert!(
                (e.log_loss - last).abs() < 1e-12,
                "the curve ends at the model itself"
            );
            // Cancelled during the curve: an error, not a model.
            let e = FittedModel::fit(
                "logistic",
                "y",
                &t,
                &BTreeMap::new(),
                7,
                &mut Vec::new(),
                &|| true,
            )
            .unwrap_err();
            assert!(matches!(e, Error::Cancelled(_)), "{e}");
        }
    }

    #[test]
    fn minus_zero_is_the_class_zero() {
        let mut t = clusters(300, 6);
        t.y.iter_mut().enumerate().for_each(|(i, y)| {
            *y = if *y > 4.0 {
                1.0
            } else if i % 2 == 0 {
                0.0
            } else {
                -0.0
            }
        });
        let m = fit("tree", "y", &t).unwrap();
        assert_eq!(m.classes.len(), 2);
        assert!(m.evaluate(&t).unwrap().accuracy > 0.99);
    }

    #[test]
    fn a_continuous_label_is_refused() {
        let mut t = clusters(600, 4);
        t.y = (0..600).map(|i| i as f64 / 10.0).collect();
        let e = fit("tree", "temp", &t).unwrap_err().to_string();
        assert!(e.contains("'temp' has 600 distinct values"), "{e}");
    }

    #[test]
    fn auc_counts_ties_half() {
        assert!((roc_auc(&[0, 1], &[0.5, 0.5]) - 0.5).abs() < 1e-12);
        assert!((roc_auc(&[0, 1], &[0.1, 0.9]) - 1.0).abs() < 1e-12);
        assert!(roc_auc(&[1, 1], &[0.1, 0.9]).is_nan());
    }
}
