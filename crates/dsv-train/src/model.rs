//! Models (linfa), their serialized form, and binary-classification metrics.

use std::collections::BTreeMap;

use linfa::prelude::*;
use linfa_bayes::GaussianNb;
use linfa_logistic::{FittedLogisticRegression, LogisticRegression};
use ndarray::{Array1, Array2, Axis};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cart::{Node, TreeParams};
use crate::error::{Error, Result};
use crate::table::Table;

/// Model names the trainer knows.
pub const MODELS: [&str; 4] = ["logistic", "tree", "forest", "naive_bayes"];

/// The fitted estimator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Body {
    /// Logistic regression.
    Logistic(FittedLogisticRegression<f64, usize>),
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
    /// The two label values: class 0 and class 1 (the positive class).
    pub classes: [f64; 2],
    /// Standardization: per-feature mean.
    pub mean: Vec<f64>,
    /// Standardization: per-feature standard deviation (1 where constant).
    pub std: Vec<f64>,
    /// Hyperparameters used.
    pub hyper: BTreeMap<String, String>,
    /// The estimator.
    pub body: Body,
}

/// Binary-classification metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Fraction correct.
    pub accuracy: f64,
    /// tp / (tp + fp).
    pub precision: f64,
    /// tp / (tp + fn).
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Area under the ROC curve of the positive-class scores.
    pub roc_auc: f64,
    /// [[tn, fp], [fn, tp]].
    pub confusion: [[u64; 2]; 2],
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

/// Maps labels to classes 0/1; exactly two distinct values are required.
fn classes_of(t: &Table, label: &str) -> Result<([f64; 2], Array1<usize>)> {
    let mut vals: Vec<f64> = t.y.clone();
    vals.sort_by(|a, b| a.total_cmp(b));
    vals.dedup();
    match vals.len() {
        0 => Err(Error::Data("the training data has no rows".into())),
        1 => Err(Error::Data(format!(
            "label '{label}' has one class only ({}) in the training data; a classifier needs two",
            vals[0]
        ))),
        2 => {
            let c = [vals[0], vals[1]];
            let y = t.y.iter().map(|v| usize::from(*v == c[1])).collect();
            Ok((c, y))
        }
        n => Err(Error::Data(format!(
            "label '{label}' has {n} classes; the built-in trainer does binary classification (two classes)"
        ))),
    }
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
    ) -> Result<FittedModel> {
        if train.rows == 0 {
            return Err(Error::Data("the training data has no rows".into()));
        }
        if train.features.is_empty() {
            return Err(Error::Data("no feature columns".into()));
        }
        let (classes, y) = classes_of(train, label)?;
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
            "logistic" => Body::Logistic(
                LogisticRegression::default()
                    .max_iterations(hyper(h, "max_iter", 1000u64)?)
                    .alpha(hyper(h, "alpha", 1.0f64)?)
                    .gradient_tolerance(hyper(h, "tol", 1e-6f64)?)
                    .fit(&ds)
                    .map_err(|e| Error::Fit(e.to_string()))?,
            ),
            "tree" => {
                let tp = tree_params(train.features.len())?;
                let mut idx: Vec<usize> = (0..train.rows).collect();
                Body::Tree(Node::fit(
                    &x,
                    y.as_slice().expect("contiguous"),
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
                let mut votes = vec![0f64; train.rows];
                for t in 0..n_trees {
                    let mut rows: Vec<usize> = (0..train.rows)
                        .map(|_| rng.gen_range(0..train.rows))
                        .collect();
                    let tree = Node::fit(&x, ys, &mut rows, &tp, &mut rng);
                    let mut correct = 0u64;
                    for (i, v) in votes.iter_mut().enumerate() {
                        *v += tree.proba(x.row(i));
                        let ens = usize::from(*v / (t + 1) as f64 > 0.5);
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
        Ok(FittedModel {
            kind: kind.to_string(),
            features: train.features.clone(),
            label: label.to_string(),
            classes,
            mean,
            std,
            hyper: hyper_in.clone(),
            body,
        })
    }

    /// Positive-class scores (probabilities where the model has them) and
    /// predicted classes (0/1) of `t`'s rows.
    pub fn scores(&self, t: &Table) -> Result<(Vec<f64>, Vec<usize>)> {
        if t.features != self.features {
            return Err(Error::Data(format!(
                "the model needs features {:?}, the data has {:?}",
                self.features, t.features
            )));
        }
        let mut x = t.matrix();
        standardize(&mut x, &self.mean, &self.std);
        Ok(match &self.body {
            Body::Logistic(m) => {
                // linfa gives P(its "positive" class); make it P(class 1).
                let flip = m.labels().pos.class != 1;
                let p = m
                    .predict_probabilities(&x)
                    .iter()
                    .map(|v| if flip { 1.0 - v } else { *v })
                    .collect();
                let c: Array1<usize> = m.predict(&x);
                (p, c.to_vec())
            }
            Body::Tree(m) => {
                let p: Vec<f64> = x.rows().into_iter().map(|r| m.proba(r)).collect();
                let c = p.iter().map(|v| usize::from(*v > 0.5)).collect();
                (p, c)
            }
            Body::NaiveBayes(m) => {
                let c: Array1<usize> = m.predict(&x);
                (c.iter().map(|v| *v as f64).collect(), c.to_vec())
            }
            Body::Forest(trees) => {
                let n = trees.len() as f64;
                let p: Vec<f64> = x
                    .rows()
                    .into_iter()
                    .map(|r| trees.iter().map(|t| t.proba(r)).sum::<f64>() / n)
                    .collect();
                let c = p.iter().map(|v| usize::from(*v > 0.5)).collect();
                (p, c)
            }
        })
    }

    /// Metrics on a labeled table.
    pub fn evaluate(&self, t: &Table) -> Result<Metrics> {
        if t.rows == 0 {
            return Err(Error::Data("the evaluation data has no rows".into()));
        }
        let (scores, pred) = self.scores(t)?;
        let truth: Vec<usize> =
            t.y.iter()
                .map(|v| {
                    if *v == self.classes[1] {
                        Ok(1)
                    } else if *v == self.classes[0] {
                        Ok(0)
                    } else {
                        Err(Error::Data(format!(
                        "label value {v} in the evaluation data was not seen in training ({} / {})",
                        self.classes[0], self.classes[1]
                    )))
                    }
                })
                .collect::<Result<_>>()?;
        Ok(metrics(&truth, &pred, &scores))
    }
}

/// Metrics from truth, predictions and positive-class scores.
pub fn metrics(truth: &[usize], pred: &[usize], scores: &[f64]) -> Metrics {
    let mut c = [[0u64; 2]; 2];
    for (t, p) in truth.iter().zip(pred) {
        c[*t][*p] += 1;
    }
    let (tn, fp, fne, tp) = (
        c[0][0] as f64,
        c[0][1] as f64,
        c[1][0] as f64,
        c[1][1] as f64,
    );
    let n = truth.len() as f64;
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let recall = if tp + fne > 0.0 { tp / (tp + fne) } else { 0.0 };
    let f1 = if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    };
    Metrics {
        accuracy: (tp + tn) / n,
        precision,
        recall,
        f1,
        roc_auc: roc_auc(truth, scores),
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

    #[test]
    fn metrics_of_a_known_confusion() {
        let truth = [1, 1, 1, 0, 0, 0, 0, 1];
        let pred = [1, 1, 0, 0, 0, 1, 0, 1];
        let m = metrics(&truth, &pred, &[0.9, 0.8, 0.4, 0.1, 0.2, 0.6, 0.3, 0.7]);
        assert_eq!(m.confusion, [[3, 1], [1, 3]]);
        assert!((m.accuracy - 0.75).abs() < 1e-12);
        assert!((m.precision - 0.75).abs() < 1e-12);
        assert!((m.recall - 0.75).abs() < 1e-12);
        // Scores rank positives above negatives except (0.4 < 0.6).
        assert!((m.roc_auc - 15.0 / 16.0).abs() < 1e-12, "{}", m.roc_auc);
    }

    #[test]
    fn auc_counts_ties_half() {
        assert!((roc_auc(&[0, 1], &[0.5, 0.5]) - 0.5).abs() < 1e-12);
        assert!((roc_auc(&[0, 1], &[0.1, 0.9]) - 1.0).abs() < 1e-12);
        assert!(roc_auc(&[1, 1], &[0.1, 0.9]).is_nan());
    }
}
