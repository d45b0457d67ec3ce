//! CART decision trees (Gini impurity, thresholds at midpoints between
//! distinct values, ties broken by the widest margin, leaves keep their
//! class-1 fraction).
//!
//! Written here rather than taken from linfa-trees: on the occupancy data a
//! depth-3 linfa tree reached 0.976 test accuracy where CART (as in the
//! reference, scikit-learn's `DecisionTreeClassifier`) reaches 0.993, and
//! leaf probabilities give a real ROC AUC and soft forest votes.

use ndarray::{Array2, ArrayView1};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A tree node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Node {
    /// A leaf: fraction of class 1 among its training rows, and their count.
    Leaf {
        /// P(class 1).
        p1: f64,
        /// Training rows that reached it.
        n: u64,
    },
    /// `x[feature] <= threshold` goes left.
    Split {
        /// Feature index.
        feature: usize,
        /// Threshold.
        threshold: f64,
        /// Rows at or below.
        left: Box<Node>,
        /// Rows above.
        right: Box<Node>,
    },
}

/// Growth limits.
#[derive(Debug, Clone, Copy)]
pub struct TreeParams {
    /// Deepest level (0 = unlimited).
    pub max_depth: usize,
    /// Fewest rows a node needs to be split.
    pub min_samples_split: usize,
    /// Fewest rows in each child.
    pub min_samples_leaf: usize,
    /// Features tried per split (random subset when below the count).
    pub max_features: usize,
}

impl Node {
    /// Grows a tree on rows `idx` of `x` / `y`.
    pub fn fit(
        x: &Array2<f64>,
        y: &[usize],
        idx: &mut [usize],
        p: &TreeParams,
        rng: &mut StdRng,
    ) -> Node {
        grow(x, y, idx, p, 1, rng)
    }

    /// P(class 1) for one row.
    pub fn proba(&self, row: ArrayView1<'_, f64>) -> f64 {
        let mut n = self;
        loop {
            match n {
                Node::Leaf { p1, .. } => return *p1,
                Node::Split {
                    feature,
                    threshold,
                    left,
                    right,
                } => {
                    n = if row[*feature] <= *threshold {
                        left
                    } else {
                        right
                    }
                }
            }
        }
    }
}

fn gini(pos: f64, n: f64) -> f64 {
    if n == 0.0 {
        return 0.0;
    }
    let p = pos / n;
    2.0 * p * (1.0 - p)
}

fn grow(
    x: &Array2<f64>,
    y: &[usize],
    idx: &mut [usize],
    p: &TreeParams,
    depth: usize,
    rng: &mut StdRng,
) -> Node {
    let n = idx.len();
    let pos = idx.iter().filter(|i| y[**i] == 1).count();
    let leaf = Node::Leaf {
        p1: if n == 0 { 0.0 } else { pos as f64 / n as f64 },
        n: n as u64,
    };
    if pos == 0
        || pos == n
        || n < p.min_samples_split.max(2)
        || (p.max_depth > 0 && depth > p.max_depth)
    {
        return leaf;
    }
    let nf = x.ncols();
    let mut feats: Vec<usize> = (0..nf).collect();
    let k = p.max_features.clamp(1, nf);
    if k < nf {
        for i in 0..k {
            let j = rng.gen_range(i..nf);
            feats.swap(i, j);
        }
        feats.truncate(k);
    }
    let parent = gini(pos as f64, n as f64) * n as f64;
    // (impurity, feature, threshold, gap): equal impurities are broken by the
    // wider gap between the two values (features are standardized), the
    // split with the largest margin.
    let mut best: Option<(f64, usize, f64, f64)> = None;
    let mut order: Vec<usize> = idx.to_vec();
    for &f in &feats {
        order.sort_by(|a, b| x[[*a, f]].total_cmp(&x[[*b, f]]));
        let mut lpos = 0usize;
        for i in 0..n - 1 {
            lpos += usize::from(y[order[i]] == 1);
            let (a, b) = (x[[order[i], f]], x[[order[i + 1], f]]);
            let nl = i + 1;
            if a == b || nl < p.min_samples_leaf || n - nl < p.min_samples_leaf {
                continue;
            }
            let imp = gini(lpos as f64, nl as f64) * nl as f64
                + gini((pos - lpos) as f64, (n - nl) as f64) * (n - nl) as f64;
            let better = match best {
                None => true,
                Some((bi, _, _, gap)) => imp < bi - 1e-9 || (imp <= bi + 1e-9 && b - a > gap),
            };
            if better {
                best = Some((imp, f, a + (b - a) / 2.0, b - a));
            }
        }
    }
    let Some((imp, feature, threshold, _)) = best else {
        return leaf;
    };
    if imp >= parent - 1e-12 {
        return leaf;
    }
    // Partition idx in place: left part first.
    let mut l = 0;
    for i in 0..n {
        if x[[idx[i], feature]] <= threshold {
            idx.swap(i, l);
            l += 1;
        }
    }
    let (li, ri) = idx.split_at_mut(l);
    Node::Split {
        feature,
        threshold,
        left: Box::new(grow(x, y, li, p, depth + 1, rng)),
        right: Box::new(grow(x, y, ri, p, depth + 1, rng)),
    }
}
