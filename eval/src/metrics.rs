//! The paper's metrics (sec. IV.B) over held-out runs, per method:
//! - per run: detected if a verdict on a window that ended after the injection's first
//!   application says error (EDR, eq. 11); an alarm in a window that ended at or before it is
//!   a false alarm, counted apart ([`Counts::pre_injection_alarms`]) and never a detection;
//!   located if the top-1 of its least normal alarming verdict after the injection names the
//!   injected function (FLR, eq. 12; also top-3, and by (function, kind)), or for a function
//!   no training run injected into, the nearest trained one ([`nearest_known`]); a normal run
//!   with any alarm is a false alarm;
//! - every rate with its count and a Wilson 95% interval ([`wilson`]), and beside top-1 what
//!   a uniform guess and the most frequent training class would get ([`Chance`]);
//! - FLD: distance in preorder position, in the normal FCT ([`Reference`]), between the located
//!   and the injected function;
//! - FDD: from the injection's first application to the first alarming verdict's report;
//! - per window: faulty windows alarmed and located, normal windows alarmed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use afetm_diagnosis::Class;
use afetm_proto as pb;
use serde::{Deserialize, Serialize};

use crate::{case::Case, method::Verdict};

/// The normal FCT in preorder, for FLD: every function's first position.
#[derive(Clone, Debug, Default)]
pub struct Reference {
    position: HashMap<String, usize>,
}

impl Reference {
    /// Merges normal trees by call path (first seen first) and numbers the result in preorder.
    pub fn from_trees<'a>(trees: impl IntoIterator<Item = &'a pb::Tree>) -> Reference {
        // Merged tree: node -> (function, children in first-seen order).
        let mut nodes: Vec<(String, Vec<usize>)> = vec![(String::new(), Vec::new())];
        let mut child: HashMap<(usize, String), usize> = HashMap::new();
        for t in trees {
            let mut at: Vec<usize> = Vec::with_capacity(t.nodes.len());
            for n in &t.nodes {
                let parent = usize::try_from(n.parent).ok().and_then(|p| at.get(p).copied()).unwrap_or(0);
                let next = nodes.len();
                let id = *child.entry((parent, n.function.clone())).or_insert(next);
                if id == next {
                    nodes.push((n.function.clone(), Vec::new()));
                    nodes[parent].1.push(id);
                }
                at.push(id);
            }
        }
        let mut position = HashMap::new();
        let mut stack: Vec<usize> = nodes[0].1.iter().rev().copied().collect();
        let mut i = 0;
        while let Some(n) = stack.pop() {
            position.entry(nodes[n].0.clone()).or_insert(i);
            i += 1;
            stack.extend(nodes[n].1.iter().rev());
        }
        Reference { position }
    }

    /// |pos(a) - pos(b)|, if both functions are in the normal FCT.
    pub fn distance(&self, a: &str, b: &str) -> Option<usize> {
        Some(self.position.get(a)?.abs_diff(*self.position.get(b)?))
    }
}

/// Per-window counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCounts {
    /// Windows the fault reached.
    pub faulty: u64,
    /// ... that alarmed.
    pub faulty_alarmed: u64,
    /// ... that alarmed with the injected function as top-1.
    pub faulty_located: u64,
    /// Windows the fault did not reach (all windows of normal runs among them).
    pub normal: u64,
    /// ... that alarmed.
    pub normal_alarmed: u64,
}

impl WindowCounts {
    fn add(&mut self, o: &WindowCounts) {
        self.faulty += o.faulty;
        self.faulty_alarmed += o.faulty_alarmed;
        self.faulty_located += o.faulty_located;
        self.normal += o.normal;
        self.normal_alarmed += o.normal_alarmed;
    }
}

/// What a method made of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// The run.
    pub run: i64,
    /// What was injected.
    pub truth: Class,
    /// A fault run: a verdict on a window that ended after the first application alarmed. A
    /// normal run: some verdict alarmed (a false alarm).
    pub detected: bool,
    /// A fault run alarmed in a window that ended at or before the first application.
    #[serde(default)]
    pub alarmed_before: bool,
    /// Whether the fault showed (see [`Case::manifested`]).
    #[serde(default)]
    pub manifested: Option<bool>,
    /// Located: the top-1 names the injected function.
    pub top1_function: bool,
    /// The injected function is among the top-3.
    pub top3_function: bool,
    /// The top-1 names the injected function and fault kind.
    pub top1_class: bool,
    /// Function and kind among the top-3.
    pub top3_class: bool,
    /// The top-1 function of the located verdict.
    pub located: Option<String>,
    /// FLD, when both functions are in the normal FCT.
    pub fld: Option<usize>,
    /// FDD, ms (live runs).
    pub fdd_ms: Option<f64>,
    /// Per window.
    pub windows: WindowCounts,
    /// The run has a root-cause line and the method named lines: whether the line is its first
    /// (HR@1) and among its first three (HR@3), compared by template (digits masked).
    #[serde(default)]
    pub line_hit: Option<(bool, bool)>,
    /// The least normality of the run's verdicts (after the injection for a fault run), and
    /// the window it was given on: where a false alarm or a miss came from.
    #[serde(default)]
    pub least: Option<(f64, Option<usize>)>,
    /// The windows whose verdict alarmed, in window order (before the injection included).
    #[serde(default)]
    pub alarmed_windows: Vec<usize>,
}

fn line_hit(case: &Case, worst: Option<&Verdict>) -> Option<(bool, bool)> {
    let root = crate::methods::logs::template(case.root_line.as_deref()?);
    let lines = &worst?.lines;
    if lines.is_empty() {
        return None;
    }
    let hit = |k: usize| lines.iter().take(k).any(|l| crate::methods::logs::template(l) == root);
    Some((hit(1), hit(3)))
}

fn names(v: &Verdict, function: &str, kind: Option<afetm_fault::FaultKind>, k: usize) -> (bool, bool) {
    let top = v.top.iter().take(k);
    let f = top.clone().any(|s| s.function == function);
    let c = top.clone().any(|s| s.function == function && s.kind.is_some() && s.kind == kind);
    (f, c)
}

/// Whether `v` speaks of a window that ended after the injection's first application. Verdicts
/// on a whole run, windows of unknown end and runs without a known application count as after.
fn after_injection(case: &Case, v: &Verdict) -> bool {
    let Some(first) = case.first_applied_ns else { return true };
    match v.window.and_then(|i| case.windows.get(i)).and_then(|w| w.end_ns) {
        Some(end) => end > first,
        None => true,
    }
}

/// Scores one run's verdicts (see the module docs).
pub fn outcome(case: &Case, verdicts: &[Verdict], reference: &Reference) -> RunOutcome {
    let (injected, kind) = match &case.truth {
        Class::Fault { function, kind } => (function.as_str(), Some(*kind)),
        Class::Normal => ("", None),
    };
    let fault = kind.is_some();
    // A normal run has no injection: every alarm is a false alarm.
    let after: Vec<&Verdict> = verdicts.iter().filter(|v| !fault || after_injection(case, v)).collect();
    let alarmed_before = fault && verdicts.iter().any(|v| v.error && !after_injection(case, v));
    let detected = after.iter().any(|v| v.error);
    let worst = after.iter().copied().filter(|v| v.error).min_by(|a, b| a.normality.total_cmp(&b.normality));
    let function = case.located_as.as_deref().unwrap_or(injected);
    let (mut t1f, mut t1c, mut t3f, mut t3c) = (false, false, false, false);
    if let (Some(w), true) = (worst, fault) {
        if w.assumed_located {
            (t1f, t1c, t3f, t3c) = (true, true, true, true);
        } else {
            (t1f, t1c) = names(w, function, kind, 1);
            (t3f, t3c) = names(w, function, kind, 3);
        }
    }
    let located = worst.and_then(|w| w.top.first()).map(|s| s.function.clone());
    let fld = match (&located, fault) {
        (Some(l), true) => reference.distance(l, injected),
        _ => None,
    };
    let fdd_ms = case.injected_unix_ms.and_then(|inj| {
        verdicts
            .iter()
            .filter(|v| v.error)
            .filter_map(|v| v.reported_unix_ms)
            .filter(|r| *r >= inj)
            .min()
            .map(|r| (r - inj) as f64)
    });
    let mut windows = WindowCounts::default();
    for v in verdicts {
        let faulty = v.window.and_then(|i| case.windows.get(i)).is_some_and(|w| w.faulty) && fault;
        if faulty && after_injection(case, v) {
            windows.faulty += 1;
            windows.faulty_alarmed += v.error as u64;
            windows.faulty_located += (v.error && names(v, function, kind, 1).0) as u64;
        } else {
            windows.normal += 1;
            windows.normal_alarmed += v.error as u64;
        }
    }
    let least = after.iter().min_by(|a, b| a.normality.total_cmp(&b.normality)).map(|v| (v.normality, v.window));
    let mut alarmed_windows: Vec<usize> = verdicts.iter().filter(|v| v.error).filter_map(|v| v.window).collect();
    alarmed_windows.sort_unstable();
    alarmed_windows.dedup();
    RunOutcome {
        run: case.run,
        truth: case.truth.clone(),
        detected,
        alarmed_before,
        manifested: if fault { case.manifested } else { None },
        top1_function: t1f,
        top3_function: t3f,
        top1_class: t1c,
        top3_class: t3c,
        located,
        fld,
        fdd_ms: if fault { fdd_ms } else { None },
        windows,
        line_hit: if fault { line_hit(case, worst) } else { None },
        least,
        alarmed_windows,
    }
}

/// Per fault kind: runs, detected, located (top-1 function), function in the top 3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindRow {
    /// Injections of this kind.
    pub runs: u64,
    /// Detected.
    pub detected: u64,
    /// Located (top-1 function).
    pub located: u64,
    /// The function among the top 3 (the crash and deadlock target is on top-3).
    /// Rows scored before it was recorded read 0.
    #[serde(default)]
    pub located_top3: u64,
}

/// The numerators behind [`Scores`]' rates, so that every rate can be printed as k of n with
/// its interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Fault runs detected after the injection.
    pub detected: u64,
    /// Fault runs whose top-1 names the function.
    pub top1_function: u64,
    /// ... among the top-3.
    pub top3_function: u64,
    /// Fault runs whose top-1 names function and kind.
    pub top1_class: u64,
    /// ... among the top-3.
    pub top3_class: u64,
    /// Normal runs with an alarm.
    pub false_alarms: u64,
    /// Fault runs with an alarm in a window that ended before the first application.
    pub pre_injection_alarms: u64,
    /// Fault runs whose fault is known to have shown.
    pub manifested: u64,
    /// ... detected.
    pub manifested_detected: u64,
}

/// A method's figures over a set of runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// The counts behind the rates.
    #[serde(default)]
    pub counts: Counts,
    /// EDR over the fault runs whose fault is known to have shown (`counts.manifested`).
    #[serde(default)]
    pub edr_manifested: f64,
    /// Fault injections scored.
    pub fault_runs: u64,
    /// Normal runs scored.
    pub normal_runs: u64,
    /// EDR (eq. 11).
    pub edr: f64,
    /// FLR (eq. 12), top-1 by function.
    pub flr_top1_function: f64,
    /// FLR, top-3 by function.
    pub flr_top3_function: f64,
    /// FLR, top-1 by (function, kind).
    pub flr_top1_class: f64,
    /// FLR, top-3 by (function, kind).
    pub flr_top3_class: f64,
    /// Normal runs with an alarm / normal runs.
    pub false_alarm_rate: f64,
    /// FLD values (detected runs whose located and injected functions are both in the normal
    /// FCT).
    pub fld: Vec<usize>,
    /// Detected runs without an FLD (a function outside the normal FCT).
    pub fld_undefined: u64,
    /// FDD per detected live run, ms.
    pub fdd_ms: Vec<f64>,
    /// Compute time per verdict, us.
    pub compute_us: Vec<u64>,
    /// Per fault kind.
    pub per_kind: BTreeMap<String, KindRow>,
    /// Per window.
    pub windows: WindowCounts,
    /// Run-level detection F1: detected fault runs against alarmed normal runs and missed
    /// fault runs.
    #[serde(default)]
    pub f1: f64,
    /// Fault runs with a root-cause line where the method named lines.
    #[serde(default)]
    pub line_runs: u64,
    /// HR@1 of root-cause lines over `line_runs`.
    #[serde(default)]
    pub hr1: f64,
    /// HR@3 of root-cause lines over `line_runs`.
    #[serde(default)]
    pub hr3: f64,
}

fn rate(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

/// Aggregates run outcomes (and the verdicts' compute times).
pub fn aggregate(outcomes: &[RunOutcome], compute_us: Vec<u64>) -> Scores {
    let mut s = Scores { compute_us, ..Scores::default() };
    let (mut det, mut t1f, mut t3f, mut t1c, mut t3c, mut alarms) = (0, 0, 0, 0, 0, 0);
    for o in outcomes {
        s.windows.add(&o.windows);
        match &o.truth {
            Class::Normal => {
                s.normal_runs += 1;
                alarms += o.detected as u64;
            }
            Class::Fault { kind, .. } => {
                s.fault_runs += 1;
                det += o.detected as u64;
                t1f += o.top1_function as u64;
                t3f += o.top3_function as u64;
                t1c += o.top1_class as u64;
                t3c += o.top3_class as u64;
                s.counts.pre_injection_alarms += o.alarmed_before as u64;
                if o.manifested == Some(true) {
                    s.counts.manifested += 1;
                    s.counts.manifested_detected += o.detected as u64;
                }
                let row = s.per_kind.entry(kind.to_string()).or_default();
                row.runs += 1;
                row.detected += o.detected as u64;
                row.located += o.top1_function as u64;
                row.located_top3 += o.top3_function as u64;
                match (o.detected, o.fld) {
                    (true, Some(d)) => s.fld.push(d),
                    (true, None) => s.fld_undefined += 1,
                    _ => {}
                }
                s.fdd_ms.extend(o.fdd_ms);
                if let Some((h1, h3)) = o.line_hit {
                    s.line_runs += 1;
                    s.hr1 += h1 as u64 as f64;
                    s.hr3 += h3 as u64 as f64;
                }
            }
        }
    }
    s.counts = Counts {
        detected: det,
        top1_function: t1f,
        top3_function: t3f,
        top1_class: t1c,
        top3_class: t3c,
        false_alarms: alarms,
        ..s.counts
    };
    s.edr = rate(det, s.fault_runs);
    s.edr_manifested = rate(s.counts.manifested_detected, s.counts.manifested);
    s.flr_top1_function = rate(t1f, s.fault_runs);
    s.flr_top3_function = rate(t3f, s.fault_runs);
    s.flr_top1_class = rate(t1c, s.fault_runs);
    s.flr_top3_class = rate(t3c, s.fault_runs);
    s.false_alarm_rate = rate(alarms, s.normal_runs);
    s.f1 = rate(2 * det, 2 * det + alarms + (s.fault_runs - det));
    s.hr1 = if s.line_runs == 0 { 0.0 } else { s.hr1 / s.line_runs as f64 };
    s.hr3 = if s.line_runs == 0 { 0.0 } else { s.hr3 / s.line_runs as f64 };
    s
}

/// The q-quantile (nearest rank) of `values`, `None` if empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// Mean of `values`, `None` if empty.
pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// The Wilson score interval at 95% for `k` successes in `n` trials, as (low, high); `None`
/// for `n = 0`. Unlike `k/n +- 1.96 se` it stays inside [0, 1] and is not empty at `k = 0`:
/// 0 of 30 gives (0, 0.114).
pub fn wilson(k: u64, n: u64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (k, n) = (k.min(n) as f64, n as f64);
    let p = k / n;
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / (1.0 + z2 / n);
    // At k = 0 (k = n) the bound is 0 (1) exactly; rounding would leave a speck.
    let lo = if k == 0.0 { 0.0 } else { (centre - half).max(0.0) };
    let hi = if k == n { 1.0 } else { (centre + half).min(1.0) };
    Some((lo, hi))
}

/// `k/n` as a percentage with the count and its Wilson interval: `26% (9/34, 15-43%)`.
pub fn rate_text(k: u64, n: u64) -> String {
    match wilson(k, n) {
        None => "- (0/0)".into(),
        Some((lo, hi)) => {
            format!("{:.0}% ({k}/{n}, {:.0}-{:.0}%)", 100.0 * k as f64 / n as f64, 100.0 * lo, 100.0 * hi)
        }
    }
}

/// The trained function nearest to `function` in the normal FCT's preorder (ties: the first
/// by name): what a method that can only name trained classes is scored against for a
/// function no training run injected into. `None` when `function` is not in the normal FCT.
pub fn nearest_known<'a>(reference: &Reference, function: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    known.iter().filter_map(|k| Some((reference.distance(function, k)?, k.as_str()))).min().map(|(_, k)| k)
}

/// What guessing would get on top-1 function, beside a method's FLR.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Chance {
    /// Functions a method trained on these runs can name.
    pub functions: usize,
    /// A uniform guess among them: 1 / functions.
    pub uniform: f64,
    /// The function most training fault runs injected into.
    pub majority_function: String,
    /// Always naming it: the share of the scored fault runs whose function it is.
    pub majority: f64,
}

/// [`Chance`] for `scored` (their located-as function, else the injected one) against the
/// training fault runs `train`; `None` without either.
pub fn chance(train: &[Case], scored: &[Case]) -> Option<Chance> {
    let fn_of = |c: &Case| match &c.truth {
        Class::Fault { function, .. } => Some(c.located_as.clone().unwrap_or_else(|| function.clone())),
        Class::Normal => None,
    };
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for f in train.iter().filter_map(|c| match &c.truth {
        Class::Fault { function, .. } => Some(function.clone()),
        Class::Normal => None,
    }) {
        *runs.entry(f).or_default() += 1;
    }
    let (majority_function, _) = runs.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))?;
    let scored: Vec<String> = scored.iter().filter_map(fn_of).collect();
    if scored.is_empty() {
        return None;
    }
    Some(Chance {
        functions: runs.len(),
        uniform: 1.0 / runs.len() as f64,
        majority_function: majority_function.clone(),
        majority: scored.iter().filter(|f| *f == majority_function).count() as f64 / scored.len() as f64,
    })
}
