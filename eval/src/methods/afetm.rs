//! AFETM (AFCT_GCN, sec. III.C.2): the trained GCN on each window's AFCT, with the verdict of
//! a thread killed or stopped by a fault (`afetm_diagnosis::fate`) in its window, as the
//! daemon gives them, offline ([`Afetm`]); and the verdicts the daemon stored while it served
//! ([`Online`]), whose report times give the FDD of the real pipeline.

use std::collections::BTreeMap;

use afetm_diagnosis::{Diagnosis, Model, fate};

use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict, per_window},
};

/// Suspects kept per verdict.
pub const TOP_K: usize = 3;

/// The GCN on the window's AFCT, and the threads' fates.
pub struct Afetm {
    model: Model,
    name: String,
    fates: bool,
}

impl Afetm {
    /// Wraps a trained model.
    pub fn new(model: Model, name: &str) -> Afetm {
        Afetm { model, name: name.to_string(), fates: true }
    }

    /// The GCN alone, blind to how threads ended (the ablation of the fates).
    pub fn without_fates(self) -> Afetm {
        Afetm { fates: false, ..self }
    }
}

fn verdict_of(d: &Diagnosis) -> Verdict {
    let top = d.top.iter().map(|s| Suspect { function: s.function.clone(), kind: Some(s.kind) }).collect();
    Verdict::new(d.error, f64::from(d.p_normal), top)
}

/// The fates' verdicts in `case`, as the daemon gives them: per process window, the one its
/// fates show ([`fate::verdict`]), on the window of the thread it names.
pub fn fate_verdicts(case: &Case) -> Vec<Verdict> {
    let mut by_window: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
    for (i, w) in case.windows.iter().enumerate() {
        by_window.entry((w.pid, w.start_ns)).or_default().push(i);
    }
    let mut out = Vec::new();
    for threads in by_window.values() {
        let fates: Vec<fate::ThreadFate> = threads.iter().filter_map(|&i| case.windows[i].fate.clone()).collect();
        let Some((tid, d)) = fate::verdict(&fates, TOP_K) else { continue };
        let Some(&i) = threads.iter().find(|&&i| case.windows[i].tid == tid) else { continue };
        let mut v = verdict_of(&d);
        v.window = Some(i);
        v.reported_unix_ms = case.windows[i].end_unix_ms;
        out.push(v);
    }
    out
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
        Ok(Some(verdict_of(&self.model.diagnose(tree, TOP_K)?)))
    }

    /// The GCN's verdicts, where a fate shows a fault replaced by the fate's (the daemon skips
    /// the GCN for that window).
    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let mut out = per_window(case, |w| self.window(w))?;
        if self.fates {
            for v in fate_verdicts(case) {
                out.retain(|o| o.window != v.window);
                out.push(v);
            }
        }
        Ok(out)
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
