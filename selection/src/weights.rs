//! Function weights `w_j` of AFETM sec. III.A: calls per second of each function under the
//! workload, sampled with the agent's count-only mode. Functions never called weigh 0.
//!
//! The weights file is what `afetm-analyzer weights` (and `cargo xtask testbed sample`) write
//! and `afetm-analyzer select` reads:
//!
//! ```json
//! { "module": "redis-server", "period_s": 20.0, "workload": "CRUD mix, 8 connections",
//!   "functions": { "processCommand": { "calls": 31200, "per_sec": 1560.0 } } }
//! ```
//! Only functions that were called are listed; every other function of the module has weight 0.

use std::{collections::BTreeMap, path::Path};

use afetm_elf::structure::Structure;
use afetm_proto as pb;
use serde::{Deserialize, Serialize};

use crate::Instance;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("reading weights {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("weights {path}: {error}")]
    Parse { path: String, error: serde_json::Error },
    #[error("sampling period must be positive, got {0} s")]
    Period(f64),
    #[error("weight of {0} is {1}; weights must be finite and >= 0")]
    Bad(String, f64),
    #[error("no counts for module {0:?}: was the agent in count mode on it during the sampling period?")]
    NoCounts(String),
    #[error("cannot scale weights by work: {0} requests sampled, untraced rate {1} req/s (both must be > 0)")]
    Scale(u64, f64),
    #[error("none of the {0} weighted functions is a function of {1} ({2} functions): weights from another binary?")]
    Mismatch(usize, String, usize),
}

/// Calls of one function during the sampling period.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionWeight {
    pub calls: u64,
    /// `w_j`: calls per second.
    pub per_sec: f64,
}

/// The weights of one module's functions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Weights {
    /// Module name as the agent reports it (the file name of the traced binary).
    pub module: String,
    /// Length of the sampling period, seconds.
    pub period_s: f64,
    /// Free text: what load ran during the period.
    #[serde(default)]
    pub workload: String,
    /// Called functions; absent ones weigh 0.
    pub functions: BTreeMap<String, FunctionWeight>,
    /// How counting every function disturbed the workload, when the sampler measured it;
    /// `per_sec` is then scaled to the untraced rate (see [`Weights::scale_to`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
}

/// The sampling's own effect on the workload it measures. Counting every function slows a
/// server (the shop's Apache served 44 req/s instead of ~1,750 while all of libsqlite3 was
/// counted), so calls per second under sampling are not calls per second under the real load;
/// calls per request are. Weights are scaled by `real_rps / sample_rps`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Requests the workload completed during the sampling period.
    pub requests: u64,
    /// Their rate while every function was counted.
    pub sample_rps: f64,
    /// The same workload's rate untraced, measured just before.
    pub real_rps: f64,
    /// `real_rps / sample_rps`.
    pub slowdown: f64,
}

/// How the weights matched a structure.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matched {
    /// Weighted functions found in the structure.
    pub found: usize,
    /// Weighted names not in the structure (e.g. functions of another module), with their
    /// calls per second; they take no part in the selection.
    pub missing: Vec<(String, f64)>,
}

impl Weights {
    /// Weights from the counts the analyzer stored for one module over `period_s` seconds.
    pub fn from_counts(
        module: &str,
        counts: &[pb::FunctionCount],
        period_s: f64,
        workload: &str,
    ) -> Result<Weights, WeightsError> {
        if !(period_s.is_finite() && period_s > 0.0) {
            return Err(WeightsError::Period(period_s));
        }
        let functions: BTreeMap<String, FunctionWeight> = counts
            .iter()
            .filter(|c| c.module == module && c.calls > 0)
            .map(|c| (c.function.clone(), FunctionWeight { calls: c.calls, per_sec: c.calls as f64 / period_s }))
            .collect();
        if functions.is_empty() {
            return Err(WeightsError::NoCounts(module.to_string()));
        }
        Ok(Weights { module: module.to_string(), period_s, workload: workload.to_string(), functions, sampling: None })
    }

    /// Rescales `per_sec` from the sampled rate to the untraced one: calls per request
    /// (`calls / requests`) times `real_rps`. Functions driven by time rather than requests
    /// (timers) come out overweighted by the slowdown, which errs on the safe side of a budget.
    pub fn scale_to(&mut self, requests: u64, real_rps: f64) -> Result<(), WeightsError> {
        if requests == 0 || !(real_rps.is_finite() && real_rps > 0.0) {
            return Err(WeightsError::Scale(requests, real_rps));
        }
        let sample_rps = requests as f64 / self.period_s;
        for w in self.functions.values_mut() {
            w.per_sec = w.calls as f64 / requests as f64 * real_rps;
        }
        self.sampling = Some(Sampling { requests, sample_rps, real_rps, slowdown: real_rps / sample_rps });
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Weights, WeightsError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| WeightsError::Io { path: p.clone(), error })?;
        let w: Weights = serde_json::from_str(&text).map_err(|error| WeightsError::Parse { path: p, error })?;
        w.check()?;
        Ok(w)
    }

    pub fn check(&self) -> Result<(), WeightsError> {
        if !(self.period_s.is_finite() && self.period_s > 0.0) {
            return Err(WeightsError::Period(self.period_s));
        }
        for (name, w) in &self.functions {
            if !w.per_sec.is_finite() || w.per_sec < 0.0 {
                return Err(WeightsError::Bad(name.clone(), w.per_sec));
            }
        }
        Ok(())
    }

    /// The MWSCP-UBC instance (eqs 1-4) of `structure` under these weights: function `j` of the
    /// structure covers `structure.covers[j]` and weighs its calls per second (0 if never called).
    pub fn instance(&self, structure: &Structure) -> Result<(Instance, Matched), WeightsError> {
        let mut weights = vec![0.0; structure.functions.len()];
        let index: std::collections::HashMap<&str, usize> =
            structure.functions.iter().enumerate().map(|(j, f)| (f.name.as_str(), j)).collect();
        let mut matched = Matched::default();
        for (name, w) in &self.functions {
            match index.get(name.as_str()) {
                Some(&j) => {
                    weights[j] = w.per_sec;
                    matched.found += 1;
                }
                None => matched.missing.push((name.clone(), w.per_sec)),
            }
        }
        if matched.found == 0 && !self.functions.is_empty() {
            return Err(WeightsError::Mismatch(
                self.functions.len(),
                structure.module.clone(),
                structure.functions.len(),
            ));
        }
        matched.missing.sort_by(|a, b| b.1.total_cmp(&a.1));
        let inst = Instance { blocks: structure.blocks, covers: structure.covers.clone(), weights };
        Ok((inst, matched))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(module: &str, f: &str, calls: u64) -> pb::FunctionCount {
        pb::FunctionCount { module: module.into(), function: f.into(), calls, interval_ns: 0 }
    }

    #[test]
    fn counts_become_calls_per_second_of_one_module() {
        let c = [count("m", "a", 100), count("m", "b", 0), count("other", "a", 7), count("m", "c", 5)];
        let w = Weights::from_counts("m", &c, 10.0, "test").unwrap();
        assert_eq!(w.functions.len(), 2);
        assert_eq!(w.functions["a"].per_sec, 10.0);
        assert_eq!(w.functions["c"].per_sec, 0.5);
        assert!(matches!(Weights::from_counts("m", &c, 0.0, ""), Err(WeightsError::Period(_))));
        assert!(matches!(Weights::from_counts("x", &c, 1.0, ""), Err(WeightsError::NoCounts(_))));
    }

    #[test]
    fn scaling_by_work_uses_calls_per_request_at_the_real_rate() {
        // 10 s sample, 100 requests (10 req/s, slowed down), 1,000 req/s untraced.
        let mut w = Weights::from_counts("m", &[count("m", "a", 300), count("m", "b", 5)], 10.0, "").unwrap();
        w.scale_to(100, 1000.0).unwrap();
        assert_eq!(w.functions["a"].per_sec, 3000.0);
        assert_eq!(w.functions["b"].per_sec, 50.0);
        let s = w.sampling.clone().unwrap();
        assert_eq!((s.sample_rps, s.slowdown), (10.0, 100.0));
        assert!(matches!(w.scale_to(0, 1.0), Err(WeightsError::Scale(..))));
        assert!(matches!(w.scale_to(1, f64::NAN), Err(WeightsError::Scale(..))));
    }

    #[test]
    fn file_round_trip_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.json");
        let w = Weights::from_counts("m", &[count("m", "a", 3)], 3.0, "").unwrap();
        std::fs::write(&p, serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(Weights::load(&p).unwrap(), w);
        std::fs::write(&p, r#"{"module":"m","period_s":1,"functions":{"a":{"calls":1,"per_sec":-1}}}"#).unwrap();
        assert!(Weights::load(&p).unwrap_err().to_string().contains("must be finite and >= 0"));
        std::fs::write(&p, r#"{"module":"m","period_s":1,"functions":{},"extra":1}"#).unwrap();
        assert!(matches!(Weights::load(&p), Err(WeightsError::Parse { .. })));
        assert!(matches!(Weights::load(&dir.path().join("none")), Err(WeightsError::Io { .. })));
    }
}
