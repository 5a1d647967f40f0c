//! The fusion of the GCN with the log models into one verdict (issue 13, sec. 5).
//!
//! * Detection: `P(error) = σ(b + w_g logit(p_gcn) + w_l logit(p_logs))`, a logistic
//!   regression over the GCN's P(error) (1 - P(normal) of the window's worst thread) and
//!   Chimera's P(anomalous); a window without logs contributes `logit(0.5) = 0`. The inputs
//!   are clipped to `[0.001, 0.999]`, so a saturated GCN cannot silence the logs entirely.
//! * Causes: each (function, kind) scores `λ p_gcn(c) + (1 - λ) p_case(c)`, the GCN's
//!   probability mixed with a case model's (LogSage's GARCA); λ is chosen on a grid of tenths
//!   to maximize top-1 accuracy, ties to the larger λ (the GCN).
//!
//! Both are fitted on runs the GCN did not train on (its validation runs, which its manifest
//! lists), with log models trained without those runs: fitted on the GCN's training runs,
//! the fusion would learn to trust a GCN that has memorized them.

use serde::{Deserialize, Serialize};

use crate::ReportError;

/// One fitting example: a run (or window) with its models' outputs and its truth.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The GCN's P(error).
    pub p_gcn: f64,
    /// The log model's P(anomalous), if the run logged anything.
    pub p_logs: Option<f64>,
    /// In error (a fault run).
    pub error: bool,
}

/// The fitted fusion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fusion {
    /// Bias, GCN weight, log weight.
    pub w: [f64; 3],
    /// The causes' mixing weight (1: the GCN alone).
    pub lambda: f64,
    /// Examples it was fitted on.
    pub samples: usize,
}

impl Default for Fusion {
    /// The GCN alone: P(error) = p_gcn, causes from the GCN.
    fn default() -> Self {
        Fusion { w: [0.0, 1.0, 0.0], lambda: 1.0, samples: 0 }
    }
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(0.001, 0.999);
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn features(s: &Sample) -> [f64; 3] {
    [1.0, logit(s.p_gcn), s.p_logs.map_or(0.0, logit)]
}

impl Fusion {
    /// Fits the detection weights (L2-regularized logistic regression, classes weighted
    /// equally, gradient descent) on `samples`; needs both classes.
    pub fn fit(samples: &[Sample]) -> Result<Fusion, ReportError> {
        let pos = samples.iter().filter(|s| s.error).count();
        let neg = samples.len() - pos;
        if pos == 0 || neg == 0 {
            return Err(ReportError::Fusion(format!("needs runs in error and normal runs; got {pos} and {neg}")));
        }
        let weight = |s: &Sample| if s.error { 0.5 / pos as f64 } else { 0.5 / neg as f64 };
        let mut w = [0.0, 1.0, 0.0];
        for _ in 0..2000 {
            let mut g = [0.0; 3];
            for s in samples {
                let x = features(s);
                let p = sigmoid(w.iter().zip(&x).map(|(a, b)| a * b).sum());
                let err = (p - s.error as u8 as f64) * weight(s);
                g.iter_mut().zip(&x).for_each(|(gi, xi)| *gi += err * xi);
            }
            for i in 0..3 {
                let l2 = if i == 0 { 0.0 } else { 0.01 * w[i] };
                w[i] -= 0.5 * (g[i] + l2);
            }
        }
        Ok(Fusion { w, lambda: 1.0, samples: samples.len() })
    }

    /// Chooses λ (see the module docs) on examples of (GCN probabilities, case-model
    /// probabilities, index of the true class), each over the same classes.
    pub fn fit_lambda(&mut self, examples: &[(Vec<f64>, Vec<f64>, usize)]) {
        let top1 = |l: f64| {
            examples
                .iter()
                .filter(|(g, c, t)| {
                    let mixed: Vec<f64> = g.iter().zip(c).map(|(a, b)| l * a + (1.0 - l) * b).collect();
                    (0..mixed.len()).max_by(|a, b| mixed[*a].total_cmp(&mixed[*b]).then(b.cmp(a))) == Some(*t)
                })
                .count()
        };
        // max_by_key keeps the last of equals: ascending order, so ties go to the larger λ.
        self.lambda = (0..=10).map(|i| i as f64 / 10.0).max_by_key(|l| top1(*l)).unwrap_or(1.0);
    }

    /// P(error) of a window or run.
    pub fn p_error(&self, p_gcn: f64, p_logs: Option<f64>) -> f64 {
        let x = features(&Sample { p_gcn, p_logs, error: false });
        sigmoid(self.w.iter().zip(&x).map(|(a, b)| a * b).sum())
    }

    /// A cause's fused score.
    pub fn cause(&self, p_gcn: f64, p_case: Option<f64>) -> f64 {
        match p_case {
            Some(c) => self.lambda * p_gcn + (1.0 - self.lambda) * c,
            None => p_gcn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_to_trust_the_model_that_is_right() {
        // The GCN says nothing useful (0.5 everywhere); the logs separate the classes.
        let samples: Vec<Sample> = (0..40)
            .map(|i| {
                let error = i % 2 == 0;
                Sample { p_gcn: 0.5, p_logs: Some(if error { 0.9 } else { 0.1 }), error }
            })
            .collect();
        let f = Fusion::fit(&samples).unwrap();
        assert!(f.w[2] > f.w[1].abs(), "weights {:?}", f.w);
        assert!(f.p_error(0.5, Some(0.9)) > 0.8 && f.p_error(0.5, Some(0.1)) < 0.2);
        // Without logs the GCN's own value decides, through its weight.
        assert!(Fusion::fit(&samples[..1]).is_err());
    }

    #[test]
    fn lambda_follows_the_better_ranking() {
        // The case model always ranks the truth first, the GCN never: λ goes to 0.
        let ex: Vec<(Vec<f64>, Vec<f64>, usize)> =
            (0..10).map(|i| (vec![0.7, 0.3], vec![0.1, 0.9], 1 + 0 * i)).collect();
        let mut f = Fusion::default();
        f.fit_lambda(&ex);
        // The truth wins for every λ below 2/3; ties go to the larger λ.
        assert_eq!(f.lambda, 0.6);
        let ex: Vec<(Vec<f64>, Vec<f64>, usize)> = (0..10).map(|_| (vec![0.7, 0.3], vec![0.1, 0.9], 0)).collect();
        f.fit_lambda(&ex);
        assert_eq!(f.lambda, 1.0);
    }
}
