//! The plan file: what an operator (or `afetm-analyzer color`) hands the agent.
//!
//! ```json
//! { "target": { "path": "/usr/bin/redis-server" },
//!   "points": [ { "function": "processCommand", "mode": "callstack" },
//!               { "function": "call", "mode": "event" } ] }
//! ```
//! `target` is `{"path": ...}` (every process mapping that file; a shared library works too) or
//! `{"pid": N}` (that process's executable, optionally `{"pid": N, "path": lib}` for one of its
//! libraries). `function` is a symbol name, a name from `.eh_frame` (`<module>+0x<offset>`), or
//! `*` for every function of the module. `mode` is `event`, `callstack` or `count`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::v1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    pub target: Target,
    #[serde(default)]
    pub version: u64,
    pub points: Vec<Point>,
    /// How the points were chosen, when `afetm-analyzer select` wrote the plan. Informational:
    /// the agent ignores it and it is not sent over gRPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<SelectionSummary>,
}

/// The trace point selection behind a plan (AFETM sec. III.A, MWSCP-UBC).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectionSummary {
    /// `mmas` or `greedy`.
    pub algorithm: String,
    /// P = w_ub / w_total.
    pub budget: f64,
    /// Basic blocks covered, out of `blocks` (|B|).
    pub covered: usize,
    pub blocks: usize,
    /// Total weight of the selected functions (calls/s) and the bound w_ub (eq 4).
    pub weight: f64,
    pub bound: f64,
    /// F(x), eq 3.
    pub fitness: f64,
    /// Functions of F^callstack, found by coloring the normal FCTs (Alg. 2); empty when no
    /// normal FCTs were given.
    pub callstack: Vec<String>,
    /// What the plan is predicted to cost under the sampled workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Predicted>,
}

/// A plan's predicted load, from the weights (and the host's probe costs, when selected with
/// them). `afetm-analyzer select` writes it; benches compare it with what the agent sees.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Predicted {
    /// Calls of the traced functions per second: the events the agent should receive.
    pub events_per_s: f64,
    /// Of those, call-stack events.
    pub stack_events_per_s: f64,
    /// Probe CPU time, ns per second (selection with `--costs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_ns_per_s: Option<f64>,
    /// The `--max-overhead` bound (share of one core), when it was given instead of P.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_overhead: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Point {
    pub function: String,
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Event,
    Callstack,
    Count,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("plan target needs a path or a pid")]
    NoTarget,
    #[error("plan has no trace points")]
    Empty,
    #[error("trace point {0}: mode is unspecified")]
    NoMode(String),
    #[error("trace point with an empty function name")]
    EmptyName,
    #[error("cannot parse plan: {0}")]
    Parse(#[from] serde_json::Error),
}

impl PlanFile {
    pub fn parse(text: &str) -> Result<PlanFile, PlanError> {
        let plan: PlanFile = serde_json::from_str(text)?;
        plan.check()?;
        Ok(plan)
    }

    pub fn check(&self) -> Result<(), PlanError> {
        if self.target.path.is_none() && self.target.pid.is_none() {
            return Err(PlanError::NoTarget);
        }
        if self.points.is_empty() {
            return Err(PlanError::Empty);
        }
        if self.points.iter().any(|p| p.function.is_empty()) {
            return Err(PlanError::EmptyName);
        }
        Ok(())
    }

    pub fn to_proto(&self) -> v1::Plan {
        v1::Plan {
            version: self.version,
            points: self
                .points
                .iter()
                .map(|p| v1::TracePoint {
                    function: p.function.clone(),
                    mode: match p.mode {
                        Mode::Event => v1::TraceMode::Event,
                        Mode::Callstack => v1::TraceMode::Callstack,
                        Mode::Count => v1::TraceMode::Count,
                    } as i32,
                })
                .collect(),
            target_path: self.target.path.as_ref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
            target_pid: self.target.pid.unwrap_or(0),
        }
    }

    pub fn from_proto(plan: &v1::Plan) -> Result<PlanFile, PlanError> {
        let points = plan
            .points
            .iter()
            .map(|p| {
                let mode = match v1::TraceMode::try_from(p.mode) {
                    Ok(v1::TraceMode::Event) => Mode::Event,
                    Ok(v1::TraceMode::Callstack) => Mode::Callstack,
                    Ok(v1::TraceMode::Count) => Mode::Count,
                    _ => return Err(PlanError::NoMode(p.function.clone())),
                };
                Ok(Point { function: p.function.clone(), mode })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = PlanFile {
            target: Target {
                path: (!plan.target_path.is_empty()).then(|| PathBuf::from(&plan.target_path)),
                pid: (plan.target_pid != 0).then_some(plan.target_pid),
            },
            version: plan.version,
            points,
            selection: None,
        };
        out.check()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let text = r#"{"target":{"path":"/bin/true"},"points":[{"function":"main","mode":"callstack"}]}"#;
        let plan = PlanFile::parse(text).unwrap();
        assert_eq!(PlanFile::from_proto(&plan.to_proto()).unwrap(), plan);
        assert!(matches!(
            PlanFile::parse(r#"{"target":{},"points":[{"function":"a","mode":"event"}]}"#),
            Err(PlanError::NoTarget)
        ));
        assert!(matches!(PlanFile::parse(r#"{"target":{"pid":1},"points":[]}"#), Err(PlanError::Empty)));
        assert!(PlanFile::parse(r#"{"target":{"pid":1},"points":[{"function":"a","mode":"often"}]}"#).is_err());
    }
}
