//! Online evaluation from labeled feedback, and the canary gate: a
//! one-sided two-proportion z-test of the canary's online accuracy
//! against production's.

/// A model's labeled requests so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Online {
    /// Labeled rows.
    pub labeled: u64,
    /// Of which predicted right.
    pub correct: u64,
    /// Sum of −ln P(true class) (probabilities clipped to [1e-15, 1]).
    pub log_loss_sum: f64,
}

impl Online {
    /// Adds one labeled row: whether it was right and P(true class).
    pub fn add(&mut self, right: bool, p_true: f64) {
        self.labeled += 1;
        self.correct += u64::from(right);
        self.log_loss_sum += -p_true.clamp(1e-15, 1.0).ln();
    }

    /// Fraction right (NaN before any label).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.labeled as f64
    }

    /// Mean log loss (NaN before any label).
    pub fn log_loss(&self) -> f64 {
        self.log_loss_sum / self.labeled as f64
    }

    /// As JSON (for events and responses).
    pub fn json(&self) -> serde_json::Value {
        let f = |x: f64| {
            if x.is_finite() {
                serde_json::json!(x)
            } else {
                serde_json::Value::Null
            }
        };
        serde_json::json!({
            "labeled": self.labeled,
            "correct": self.correct,
            "accuracy": f(self.accuracy()),
            "log_loss": f(self.log_loss()),
        })
    }
}

/// What the gate says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few labels, or the difference is not significant yet.
    Undecided,
    /// The canary is better at the configured confidence.
    Promote(String),
    /// The canary is worse at the configured confidence.
    Reject(String),
}

/// The z statistic of "canary accuracy > production accuracy" (pooled
/// two-proportion test); 0 when undefined.
pub fn z_score(canary: &Online, production: &Online) -> f64 {
    let (n1, n2) = (canary.labeled as f64, production.labeled as f64);
    if n1 == 0.0 || n2 == 0.0 {
        return 0.0;
    }
    let (p1, p2) = (canary.accuracy(), production.accuracy());
    let p = (canary.correct + production.correct) as f64 / (n1 + n2);
    let se = (p * (1.0 - p) * (1.0 / n1 + 1.0 / n2)).sqrt();
    if se == 0.0 {
        return 0.0;
    }
    (p1 - p2) / se
}

/// The standard normal quantile (Acklam's rational approximation, relative
/// error below 1.2e-9), for `p` in (0, 1).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let lo = 0.02425;
    if p < lo {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - lo {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

/// The gate: with at least `min_labeled` labels on each side, promote when
/// the canary's accuracy is higher at `confidence` (one-sided), reject when
/// it is lower at the same confidence.
pub fn judge(canary: &Online, production: &Online, min_labeled: u64, confidence: f64) -> Verdict {
    if canary.labeled < min_labeled || production.labeled < min_labeled {
        return Verdict::Undecided;
    }
    let z = z_score(canary, production);
    let crit = normal_quantile(confidence);
    let what = format!(
        "online accuracy {:.4} ({} labeled) vs production {:.4} ({} labeled): z = {z:.2}, \
         one-sided critical value {crit:.2} at {confidence}",
        canary.accuracy(),
        canary.labeled,
        production.accuracy(),
        production.labeled
    );
    if z > crit {
        Verdict::Promote(what)
    } else if z < -crit {
        Verdict::Reject(what)
    } else {
        Verdict::Undecided
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn online(labeled: u64, correct: u64) -> Online {
        Online {
            labeled,
            correct,
            log_loss_sum: 0.0,
        }
    }

    #[test]
    fn quantiles_match_the_table() {
        for (p, z) in [
            (0.5, 0.0),
            (0.95, 1.644_853_6),
            (0.99, 2.326_347_9),
            (0.01, -2.326_347_9),
        ] {
            assert!(
                (normal_quantile(p) - z).abs() < 1e-6,
                "{p}: {}",
                normal_quantile(p)
            );
        }
    }

    #[test]
    fn the_gate_waits_then_decides_both_ways() {
        // Too few labels: no decision however large the gap.
        assert_eq!(
            judge(&online(50, 50), &online(50, 25), 100, 0.95),
            Verdict::Undecided
        );
        // 97% vs 90% over 400 each: z ≈ 3.9, promote.
        assert!(matches!(
            judge(&online(400, 388), &online(400, 360), 100, 0.95),
            Verdict::Promote(_)
        ));
        // The mirror image: reject.
        assert!(matches!(
            judge(&online(400, 360), &online(400, 388), 100, 0.95),
            Verdict::Reject(_)
        ));
        // 91% vs 90%: not significant, keep running.
        assert_eq!(
            judge(&online(400, 364), &online(400, 360), 100, 0.95),
            Verdict::Undecided
        );
        // z by hand: p1 = .97, p2 = .9, pooled .935, se = sqrt(.935 * .065 * 2/400).
        let z = z_score(&online(400, 388), &online(400, 360));
        let se = (0.935f64 * 0.065 * (2.0 / 400.0)).sqrt();
        assert!((z - 0.07 / se).abs() < 1e-9, "{z}");
    }
}
