//! AFETM (AFCT_GCN, sec. III.C.2): the trained GCN on each window's AFCT, with the verdict of
//! a thread killed or stopped by a fault (`afetm_diagnosis::fate`) in its window, combined by
//! the rule chosen on the GCN's validation runs ([`Afetm::fit_rule`]), offline ([`Afetm`]); and the verdicts the daemon stored while it served
//! ([`Online`]), whose report times give the FDD of the real pipeline.

use std::collections::{BTreeMap, HashSet};

use afetm_diagnosis::{
    Class, Diagnosis, Model,
    fate::{self, Combine, FateClass, Rules},
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
    rules: Rules,
    /// Whether a fate's last calls rank the model's fault functions first
    /// ([`fate::verdict`]'s `known`), as the daemon does; off: by recency alone (the ablation).
    known_first: bool,
    /// Whether a fate's stack at its signal ranks before its last calls, as the daemon does;
    /// off: the last calls alone, as before fate stacks (the ablation).
    stacks: bool,
}

/// The rule of `hits` with the most top-1 (function, kind) hits (then function hits, then the
/// first in [`Combine::ALL`]) if it has at least `margin` more of them than `prior`; else
/// `prior`.
fn clear_winner(hits: &[(Combine, usize, usize)], prior: Combine, margin: usize) -> Combine {
    let of = |rule: Combine| hits.iter().find(|h| h.0 == rule).map_or(0, |h| h.1);
    // max_by_key keeps the last of equals: scan in reverse so the first of ALL wins ties.
    match hits.iter().rev().max_by_key(|(_, c, f)| (*c, *f)) {
        Some(&(best, c, _)) if c >= of(prior) + margin => best,
        _ => prior,
    }
}

/// How the fate rules were chosen on the GCN's validation fault runs.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleChoice {
    /// The rules chosen: per fate class, [`Rules::PRIOR`]'s rule unless another has
    /// [`fate::RULE_MARGIN`] (or a tenth of the runs) more top-1 (function, kind) hits (the
    /// most, then most function hits, then the first in [`Combine::ALL`]).
    pub rules: Rules,
    /// Validation fault runs scored.
    pub runs: usize,
    /// Per fate class: the validation runs with a fate of that class, and per rule (rule,
    /// top-1 (function, kind) hits, top-1 function hits) over all validation fault runs.
    pub per_class: Vec<(FateClass, usize, RuleHits)>,
}

/// Per rule: (rule, top-1 (function, kind) hits, top-1 function hits).
pub type RuleHits = Vec<(Combine, usize, usize)>;

impl RuleChoice {
    /// One line for the report's notes.
    pub fn notes(&self) -> String {
        let per: Vec<String> = self
            .per_class
            .iter()
            .map(|(class, runs, hits)| {
                let h: Vec<String> = hits.iter().map(|(r, c, f)| format!("{} {c}/{f}", r.name())).collect();
                format!("{} on {runs} runs: {}", class.name(), h.join(", "))
            })
            .collect();
        format!(
            "fate rule {} (chosen on {} validation fault runs, top-1 (fn,kind)/fn; {})",
            self.rules,
            self.runs,
            per.join("; ")
        )
    }
}

impl Afetm {
    /// Wraps a trained model; a fate's verdict stands alone ([`Combine::Fate`]).
    pub fn new(model: Model, name: &str) -> Afetm {
        Afetm { model, name: name.to_string(), fates: true, rules: Rules::default(), known_first: true, stacks: true }
    }

    /// A fate's suspects from its last calls alone, its stack at the signal left out (the
    /// ablation of fate stacks).
    pub fn without_stacks(self) -> Afetm {
        Afetm { stacks: false, ..self }
    }

    /// A fate's last calls ranked by recency alone, the model's fault functions not first
    /// (the ablation of that order).
    pub fn by_recency(self) -> Afetm {
        Afetm { known_first: false, ..self }
    }

    /// The GCN alone, blind to how threads ended (the ablation of the fates).
    pub fn without_fates(self) -> Afetm {
        Afetm { fates: false, ..self }
    }

    /// Uses `rules` where a fate shows a fault.
    pub fn with_rules(self, rules: Rules) -> Afetm {
        Afetm { rules, ..self }
    }

    /// Chooses the rules on the fault runs among `train` that the GCN's manifest lists as its
    /// validation runs (never trained on, never evaluation runs), one fate class at a time
    /// (the others kept at their choice so far), and uses them. A class keeps its
    /// [`Rules::PRIOR`] rule unless another beats it clearly (see [`RuleChoice::rules`]) or
    /// no validation run shows it. `None` when the manifest lists no validation run.
    pub fn fit_rule(&mut self, train: &[Case]) -> Result<Option<RuleChoice>, EvalError> {
        let val: HashSet<i64> = self.model.manifest.training.val_run_ids.iter().copied().collect();
        let held: Vec<&Case> = train.iter().filter(|c| val.contains(&c.run) && c.truth != Class::Normal).collect();
        if held.is_empty() {
            return Ok(None);
        }
        let reference = Reference::default();
        self.rules = Rules::PRIOR;
        let margin = fate::RULE_MARGIN.max(held.len().div_ceil(10));
        let mut per_class = Vec::new();
        for class in FateClass::ALL {
            let runs = held.iter().filter(|c| self.fate_windows(c).iter().any(|w| w.1 == class)).count();
            let mut hits = Vec::new();
            for rule in Combine::ALL {
                self.rules.set(class, rule);
                let (mut hit_class, mut hit_function) = (0, 0);
                for c in &held {
                    let o = outcome(c, &self.diagnose(c)?, &reference);
                    hit_class += o.top1_class as usize;
                    hit_function += o.top1_function as usize;
                }
                hits.push((rule, hit_class, hit_function));
            }
            let prior = Rules::PRIOR.get(class);
            self.rules.set(class, if runs == 0 { prior } else { clear_winner(&hits, prior, margin) });
            per_class.push((class, runs, hits));
        }
        Ok(Some(RuleChoice { rules: self.rules, runs: held.len(), per_class }))
    }

    /// The GCN's diagnosis of a window's call graph, ranking `k` suspects.
    fn gcn(&self, window: &Window, k: usize) -> Result<Option<Diagnosis>, EvalError> {
        window.graph.as_ref().map(|g| self.model.diagnose_graph(g, k)).transpose().map_err(EvalError::from)
    }
}

fn verdict_of(d: &Diagnosis) -> Verdict {
    let top = d.top.iter().map(|s| Suspect { function: s.function.clone(), kind: Some(s.kind) }).collect();
    Verdict::new(d.error, f64::from(d.p_normal), top)
}

impl Afetm {
    /// Which functions a fate's last calls rank first ([`fate::verdict`]'s `known`).
    fn known(&self) -> impl Fn(&str) -> bool + '_ {
        let functions = self.model.fault_functions();
        move |f: &str| !self.known_first || functions.contains(f)
    }

    fn fate_windows(&self, case: &Case) -> Vec<(usize, FateClass, Diagnosis)> {
        fate_windows(case, &self.known(), self.stacks)
    }
}

/// Per process window of `case` whose fates show a fault: the window (index into
/// `case.windows`) of the thread [`fate::verdict`] names (its last calls in functions `known`
/// names first; the stacks left out unless `stacks`), its fate's class and the fate's verdict.
fn fate_windows(case: &Case, known: &dyn Fn(&str) -> bool, stacks: bool) -> Vec<(usize, FateClass, Diagnosis)> {
    let mut by_window: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
    for (i, w) in case.windows.iter().enumerate() {
        by_window.entry((w.pid, w.start_ns)).or_default().push(i);
    }
    let mut out = Vec::new();
    for threads in by_window.values() {
        let mut fates: Vec<fate::ThreadFate> = threads.iter().filter_map(|&i| case.windows[i].fate.clone()).collect();
        if !stacks {
            fates.iter_mut().for_each(|f| f.stack.clear());
        }
        let Some((tid, d)) = fate::verdict(&fates, TOP_K, known) else { continue };
        let Some(&i) = threads.iter().find(|&&i| case.windows[i].tid == tid) else { continue };
        let Some(class) = fate::class_of(&fates, tid) else { continue };
        out.push((i, class, d));
    }
    out
}

/// The fates' verdicts in `case`, as the daemon gives them: per process window, the one its
/// fates show ([`fate::verdict`], functions `known` names first), on the window of the thread
/// it names, combined by the rule for its fate's class with `gcn`'s diagnosis of that
/// thread's window (index into `case.windows`). `stacks`: whether the fates' stacks count
/// (off: their last calls alone, the ablation).
pub fn fate_verdicts(
    case: &Case,
    rules: Rules,
    known: &dyn Fn(&str) -> bool,
    stacks: bool,
    gcn: impl Fn(usize) -> Result<Option<Diagnosis>, EvalError>,
) -> Result<Vec<Verdict>, EvalError> {
    let mut out = Vec::new();
    for (i, class, d) in fate_windows(case, known, stacks) {
        let rule = rules.get(class);
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
            let gcn = |i: usize| self.gcn(&case.windows[i], self.model.manifest.classes.len());
            for v in fate_verdicts(case, self.rules, &self.known(), self.stacks, gcn)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_replaces_the_prior_one_only_by_a_clear_margin() {
        let hits: RuleHits =
            vec![(Combine::Fate, 4, 12), (Combine::Kinds, 11, 12), (Combine::Merge, 8, 13), (Combine::Gcn, 12, 13)];
        // One run ahead is noise: the prior stays.
        assert_eq!(clear_winner(&hits, Combine::Kinds, 2), Combine::Kinds);
        // Far ahead of the prior: the best replaces it.
        assert_eq!(clear_winner(&hits, Combine::Fate, 2), Combine::Gcn);
        // Ties go to the first of Combine::ALL among the best.
        let tied: RuleHits =
            vec![(Combine::Fate, 1, 1), (Combine::Kinds, 5, 6), (Combine::Merge, 5, 6), (Combine::Gcn, 0, 0)];
        assert_eq!(clear_winner(&tied, Combine::Fate, 2), Combine::Kinds);
        assert_eq!(clear_winner(&[], Combine::Fate, 2), Combine::Fate);
    }
}
