//! AFETM (AFCT_GCN, sec. III.C.2): the trained GCN on each window's AFCT, with the verdict of
//! a thread killed or stopped by a fault (`afetm_diagnosis::fate`) in its window, combined by
//! the rule chosen on the GCN's validation runs ([`Afetm::fit_rule`]), offline ([`Afetm`]); and the verdicts the daemon stored while it served
//! ([`Online`]), whose report times give the FDD of the real pipeline.

use std::collections::{BTreeMap, HashSet};

use afetm_diagnosis::{
    Class, Diagnosis, Model,
    fate::{self, Combine},
};

use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict, per_window},
    metrics::{Reference, outcome},
};

/// Suspects kept per verdict.
pub const TOP_K: usize = 3;

/// The GCN on the window's AFCT, and the threads' fates.
pub struct Afetm {
    model: Model,
    name: String,
    fates: bool,
    combine: Combine,
}

/// How each [`Combine`] rule did on the GCN's validation fault runs: runs whose top-1 named
/// the function and kind, and the function.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleChoice {
    /// The rule chosen: most (function, kind) top-1 hits, then most function hits, then the
    /// first in [`Combine::ALL`].
    pub rule: Combine,
    /// Validation fault runs scored.
    pub runs: usize,
    /// Per rule: (rule, top-1 (function, kind) hits, top-1 function hits).
    pub hits: Vec<(Combine, usize, usize)>,
}

impl RuleChoice {
    /// One line for the report's notes.
    pub fn notes(&self) -> String {
        let per: Vec<String> = self.hits.iter().map(|(r, c, f)| format!("{} {c}/{f}", r.name())).collect();
        format!(
            "fate rule {} (chosen on {} validation fault runs, top-1 (fn,kind)/fn: {})",
            self.rule.name(),
            self.runs,
            per.join(", ")
        )
    }
}

impl Afetm {
    /// Wraps a trained model; a fate's verdict stands alone ([`Combine::Fate`]).
    pub fn new(model: Model, name: &str) -> Afetm {
        Afetm { model, name: name.to_string(), fates: true, combine: Combine::Fate }
    }

    /// The GCN alone, blind to how threads ended (the ablation of the fates).
    pub fn without_fates(self) -> Afetm {
        Afetm { fates: false, ..self }
    }

    /// Uses `rule` where a fate shows a fault.
    pub fn with_rule(self, rule: Combine) -> Afetm {
        Afetm { combine: rule, ..self }
    }

    /// Chooses the rule on the fault runs among `train` that the GCN's manifest lists as its
    /// validation runs (never trained on, never evaluation runs), and uses it. `None` when the
    /// manifest lists none.
    pub fn fit_rule(&mut self, train: &[Case]) -> Result<Option<RuleChoice>, EvalError> {
        let val: HashSet<i64> = self.model.manifest.training.val_run_ids.iter().copied().collect();
        let held: Vec<&Case> = train.iter().filter(|c| val.contains(&c.run) && c.truth != Class::Normal).collect();
        if held.is_empty() {
            return Ok(None);
        }
        let reference = Reference::default();
        let mut hits = Vec::new();
        for rule in Combine::ALL {
            self.combine = rule;
            let (mut class, mut function) = (0, 0);
            for c in &held {
                let o = outcome(c, &self.diagnose(c)?, &reference);
                class += o.top1_class as usize;
                function += o.top1_function as usize;
            }
            hits.push((rule, class, function));
        }
        // max_by_key keeps the last of equals: scan in reverse so the first of ALL wins ties.
        let rule = hits.iter().rev().max_by_key(|(_, c, f)| (*c, *f)).map_or(Combine::Fate, |h| h.0);
        self.combine = rule;
        Ok(Some(RuleChoice { rule, runs: held.len(), hits }))
    }

    /// The GCN's diagnosis of a window, ranking `k` suspects.
    fn gcn(&self, window: &Window, k: usize) -> Result<Option<Diagnosis>, EvalError> {
        window.afct.as_ref().map(|t| self.model.diagnose(t, k)).transpose().map_err(EvalError::from)
    }
}

fn verdict_of(d: &Diagnosis) -> Verdict {
    let top = d.top.iter().map(|s| Suspect { function: s.function.clone(), kind: Some(s.kind) }).collect();
    Verdict::new(d.error, f64::from(d.p_normal), top)
}

/// The fates' verdicts in `case`, as the daemon gives them: per process window, the one its
/// fates show ([`fate::verdict`]), on the window of the thread it names, combined by `rule`
/// with `gcn`'s diagnosis of that thread's window (index into `case.windows`).
pub fn fate_verdicts(
    case: &Case,
    rule: Combine,
    gcn: impl Fn(usize) -> Result<Option<Diagnosis>, EvalError>,
) -> Result<Vec<Verdict>, EvalError> {
    let mut by_window: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
    for (i, w) in case.windows.iter().enumerate() {
        by_window.entry((w.pid, w.start_ns)).or_default().push(i);
    }
    let mut out = Vec::new();
    for threads in by_window.values() {
        let fates: Vec<fate::ThreadFate> = threads.iter().filter_map(|&i| case.windows[i].fate.clone()).collect();
        let Some((tid, d)) = fate::verdict(&fates, TOP_K) else { continue };
        let Some(&i) = threads.iter().find(|&&i| case.windows[i].tid == tid) else { continue };
        let g = if rule == Combine::Fate { None } else { gcn(i)? };
        let mut v = verdict_of(&fate::combine(rule, d, g.as_ref(), TOP_K));
        v.window = Some(i);
        v.reported_unix_ms = case.windows[i].end_unix_ms;
        out.push(v);
    }
    Ok(out)
}

impl Method for Afetm {
    fn name(&self) -> &str {
        &self.name
    }

    fn input(&self) -> Input {
        Input::Afct
    }

    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError> {
        Ok(self.gcn(window, TOP_K)?.as_ref().map(verdict_of))
    }

    /// The GCN's verdicts, where a fate shows a fault replaced by the rule's (with
    /// [`Combine::Fate`] the daemon skips the GCN for that window).
    fn diagnose(&self, case: &Case) -> Result<Vec<Verdict>, EvalError> {
        let mut out = per_window(case, |w| self.window(w))?;
        if self.fates {
            for v in fate_verdicts(case, self.combine, |i| self.gcn(&case.windows[i], fate::RANKED))? {
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
