//! The one interface every diagnosis method implements, AFETM and the baselines alike (and the
//! log-based models of a later issue): a method looks at a [`Case`] and says, per window it
//! looked at, whether it is in error, how normal it looks, and its suspects.

use std::time::Instant;

use afetm_fault::FaultKind;

use crate::{
    EvalError,
    case::{Case, Window},
};

/// Which input a method needs (it is scored only where that input exists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    /// The full-trace FCT of every window (FCT_EDC).
    FullFct,
    /// The AFCT under the plan (AFETM, AFCT_GDC, the topology-free control).
    Afct,
    /// The servers' logs of the run (log-based).
    Logs,
}

/// A suspect: a function and, if the method says, the kind of fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suspect {
    /// The function.
    pub function: String,
    /// The fault's kind (`None`: the method names only a function).
    pub kind: Option<FaultKind>,
}

/// A method's answer for one window (or, for run-level methods, the run).
#[derive(Clone, Debug)]
pub struct Verdict {
    /// The window in [`Case::windows`]; `None` for a verdict on the whole run.
    pub window: Option<usize>,
    /// The method says "error".
    pub error: bool,
    /// How normal the window looks (lower: less normal); comparable within one method only.
    /// The run's located window is the one with the lowest.
    pub normality: f64,
    /// Suspects, most likely first.
    pub top: Vec<Suspect>,
    /// The method is idealized and assumed right whenever it detects (the paper's log-based
    /// method: FLR = EDR).
    pub assumed_located: bool,
    /// Compute time of this verdict, us.
    pub compute_us: u64,
    /// When the verdict was available, wall clock, if known (for FDD).
    pub reported_unix_ms: Option<i64>,
    /// Log lines the method names as the root cause, most likely first (log-based methods).
    pub lines: Vec<String>,
}

impl Verdict {
    /// A window's verdict (window, compute time and report time are filled in by
    /// [`Method::diagnose`]).
    pub fn new(error: bool, normality: f64, top: Vec<Suspect>) -> Verdict {
        Verdict {
            window: None,
            error,
            normality,
            top,
            assumed_located: false,
            compute_us: 0,
            reported_unix_ms: None,
            lines: Vec::new(),
        }
    }
}

/// A diagnosis method under evaluation.
pub trait Method {
    /// Its name in the report.
    fn name(&self) -> &str;

    /// What it reads.
    fn input(&self) -> Input;

    /// The verdict on one window; `None` if the window lacks the method's input.
    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError>;

    /// Verdicts on a run: by default one per window that has the input, timed, with the report
    /// time of a window that closed at a known instant.
    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        per_window(case, |w| self.window(w))
    }
}

/// [`Method::diagnose`]'s default: `window` on each window, timed, with the report time of a
/// window that closed at a known instant; for a method that adds to it.
pub fn per_window(
    case: &Case,
    mut window: impl FnMut(&Window) -> Result<Option<Verdict>, EvalError>,
) -> Result<Vec<Verdict>, EvalError> {
    let mut out = Vec::new();
    for (i, w) in case.windows.iter().enumerate() {
        let t = Instant::now();
        if let Some(mut v) = window(w)? {
            v.window = Some(i);
            v.compute_us = t.elapsed().as_micros() as u64;
            if v.reported_unix_ms.is_none() {
                v.reported_unix_ms = w.end_unix_ms.map(|e| e + (v.compute_us / 1000) as i64);
            }
            out.push(v);
        }
    }
    Ok(out)
}
