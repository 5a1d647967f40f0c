//! AFETM (AFCT_GCN, sec. III.C.2): the trained GCN on each window's AFCT, offline
//! ([`Afetm`]), and the verdicts the daemon stored while it served ([`Online`]), whose report
//! times give the FDD of the real pipeline.

use afetm_diagnosis::Model;

use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
};

/// Suspects kept per verdict.
pub const TOP_K: usize = 3;

/// The GCN on the window's AFCT.
pub struct Afetm {
    model: Model,
    name: String,
}

impl Afetm {
    /// Wraps a trained model.
    pub fn new(model: Model, name: &str) -> Afetm {
        Afetm { model, name: name.to_string() }
    }
}

impl Method for Afetm {
    fn name(&self) -> &str {
        &self.name
    }

    fn input(&self) -> Input {
        Input::Afct
    }

    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError> {
        let Some(tree) = &window.afct else { return Ok(None) };
        let d = self.model.diagnose(tree, TOP_K)?;
        let top = d.top.iter().map(|s| Suspect { function: s.function.clone(), kind: Some(s.kind) }).collect();
        Ok(Some(Verdict::new(d.error, f64::from(d.p_normal), top)))
    }
}

/// The daemon's own verdicts (one per window: its worst thread), as stored.
pub struct Online;

impl Method for Online {
    fn name(&self) -> &str {
        "AFETM (daemon)"
    }

    fn input(&self) -> Input {
        Input::Afct
    }

    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError> {
        Ok(window.stored.as_ref().map(|s| Verdict {
            window: None,
            error: s.error,
            normality: f64::from(s.p_normal),
            top: s.top.iter().map(|(f, k)| Suspect { function: f.clone(), kind: Some(*k) }).collect(),
            assumed_located: false,
            compute_us: s.latency_us,
            reported_unix_ms: Some(s.diagnosed_unix_ms),
            lines: Vec::new(),
        }))
    }

    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let mut out = Vec::new();
        for (i, w) in case.windows.iter().enumerate() {
            if let Some(mut v) = self.window(w)? {
                v.window = Some(i);
                out.push(v);
            }
        }
        Ok(out)
    }
}
