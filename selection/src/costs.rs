//! Cost-aware selection: the weight `w_j` of eqs 3-4 becomes what tracing `f_j` costs the
//! target per second (its calls per second times the measured cost of a call in its probe mode
//! at its kind of probe site, `afetm_proto::costs::ProbeCosts`), so the bound `w_ub` bounds
//! CPU time rather than a call count. The paper weighs calls alone; here a call-stack event,
//! or a probe the kernel must single-step, weighs what it costs.
//!
//! The mode of a function is only known after the selection: coloring (Alg. 2) puts some
//! selected functions in F^callstack. [`select_within`] therefore iterates: select with the
//! costs of the modes known so far, color, predict the plan's cost with the modes it got; when
//! that is over the bound, the functions coloring put in F^callstack weigh their call-stack cost
//! in the next round, and once no new such function appears the bound itself is tightened by
//! the overshoot. The plan it returns is the first that fits, or the last with `fits = false`.

use afetm_proto::{costs::ProbeCosts, plan::Mode};

use crate::{Instance, Params, Selection, SelectionError, mmas};

/// Per-function facts the cost of tracing it depends on.
#[derive(Clone, Debug)]
pub struct CostModel {
    pub costs: ProbeCosts,
    /// Whether the kernel emulates the instruction under each function's probe.
    pub emulated: Vec<bool>,
    /// Call-chain depth of each function's call-stack events (0 = the calibrated depth).
    pub frames: Vec<u32>,
}

/// What a plan is predicted to cost, per second of the sampled workload.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prediction {
    /// Calls of the traced functions (events the agent receives).
    pub events_per_s: f64,
    /// Of those, call-stack events.
    pub stack_events_per_s: f64,
    /// Probe CPU time, ns per second (0 without a cost model).
    pub probe_ns_per_s: f64,
}

impl CostModel {
    /// ns one call of function `j` costs in `mode`.
    pub fn per_call(&self, j: usize, mode: Mode) -> f64 {
        let emulated = self.emulated.get(j).copied().unwrap_or(false);
        self.costs.per_call_ns(mode, emulated, self.frames.get(j).copied().unwrap_or(0))
    }

    /// The unit of [`CostModel::weights`]: ns of one event at an emulated site.
    pub fn unit_ns(&self) -> f64 {
        self.costs.emulated.event_ns.max(1.0)
    }

    /// `w_j` in cheap-event equivalents per second (ns per second / [`CostModel::unit_ns`]):
    /// event mode, or call-stack mode where `callstack[j]`. The unit keeps the weights on the
    /// scale of calls per second, where Alg. 1's heuristic (eq 8: `1/w_j` against `eta_max` for
    /// a free function) was tuned; in raw ns every called function would look 1,000x dearer
    /// than a free one.
    pub fn weights(&self, calls: &[f64], callstack: &[bool]) -> Vec<f64> {
        let unit = self.unit_ns();
        calls
            .iter()
            .enumerate()
            .map(|(j, c)| {
                c * self.per_call(j, if callstack.get(j) == Some(&true) { Mode::Callstack } else { Mode::Event }) / unit
            })
            .collect()
    }
}

/// The cost of tracing `functions` (with `callstack[j]` in call-stack mode), from their calls
/// per second and, when given, the cost model.
pub fn predict(calls: &[f64], functions: &[usize], callstack: &[bool], model: Option<&CostModel>) -> Prediction {
    let mut p = Prediction::default();
    for &j in functions {
        let c = calls.get(j).copied().unwrap_or(0.0);
        let stack = callstack.get(j) == Some(&true);
        p.events_per_s += c;
        if stack {
            p.stack_events_per_s += c;
        }
        if let Some(m) = model {
            p.probe_ns_per_s += c * m.per_call(j, if stack { Mode::Callstack } else { Mode::Event });
        }
    }
    p
}

/// Outcome of [`select_within`].
#[derive(Clone, Debug)]
pub struct Bounded {
    pub selection: Selection,
    /// F^callstack of the selection (by function index).
    pub callstack: Vec<bool>,
    pub prediction: Prediction,
    /// The bound the last round selected under (the tightened one when the first overshot).
    pub bound_used: f64,
    pub rounds: usize,
    pub fits: bool,
}

/// Most select-color rounds.
pub const MAX_ROUNDS: usize = 8;

/// Alg. 1 under a cost bound `w_ub` (ns per second) with F^callstack decided by `color` after
/// each selection (see the module doc). `calls` are the functions' calls per second; the
/// instance's own weights are ignored.
pub fn select_within(
    inst: &Instance,
    calls: &[f64],
    model: &CostModel,
    w_ub: f64,
    params: &Params,
    mut color: impl FnMut(&[usize]) -> Vec<bool>,
) -> Result<Bounded, SelectionError> {
    let mut inst = inst.clone();
    let mut sticky = vec![false; calls.len()];
    // In the weights' unit (see `CostModel::weights`).
    let mut bound = w_ub / model.unit_ns();
    let mut last = None;
    for round in 1..=MAX_ROUNDS {
        inst.weights = model.weights(calls, &sticky);
        let selection = mmas(&inst, bound, params)?;
        let callstack = color(&selection.functions);
        let prediction = predict(calls, &selection.functions, &callstack, Some(model));
        let fits = prediction.probe_ns_per_s <= w_ub * (1.0 + 1e-9);
        let new_stack = callstack.iter().zip(&sticky).any(|(now, known)| *now && !*known);
        let out =
            Bounded { selection, callstack, prediction, bound_used: bound * model.unit_ns(), rounds: round, fits };
        if fits {
            return Ok(out);
        }
        if new_stack {
            for (s, now) in sticky.iter_mut().zip(&out.callstack) {
                *s |= *now;
            }
        } else {
            bound *= 0.98 * w_ub / out.prediction.probe_ns_per_s;
        }
        last = Some(out);
    }
    Ok(last.expect("at least one round"))
}

#[cfg(test)]
mod tests {
    use afetm_proto::costs::ModeCosts;

    use super::*;

    fn model(m: usize) -> CostModel {
        CostModel {
            costs: ProbeCosts {
                host: String::new(),
                kernel: String::new(),
                calls: 1,
                emulated: ModeCosts { count_ns: 500.0, event_ns: 1000.0, callstack_ns: 3000.0 },
                single_stepped: ModeCosts { count_ns: 10_000.0, event_ns: 11_000.0, callstack_ns: 13_000.0 },
                callstack_frames: 0,
                per_frame_ns: 0.0,
            },
            emulated: (0..m).map(|j| j != 1).collect(),
            frames: vec![0; m],
        }
    }

    #[test]
    fn weights_and_prediction_follow_mode_and_site() {
        let m = model(3);
        let calls = [10.0, 10.0, 10.0];
        // In units of an emulated event (1,000 ns).
        assert_eq!(m.weights(&calls, &[false, false, true]), vec![10.0, 110.0, 30.0]);
        let p = predict(&calls, &[0, 2], &[false, false, true], Some(&m));
        assert_eq!(p, Prediction { events_per_s: 20.0, stack_events_per_s: 10.0, probe_ns_per_s: 40_000.0 });
    }

    /// Two ways to cover block 0: function 0 (cheap as an event, but coloring always puts it in
    /// F^callstack, which triples its cost) or function 2 (a little dearer as an event). Under
    /// a bound only function 2 fits once 0's real mode is known; the first round picks 0.
    #[test]
    fn callstack_mode_found_by_coloring_is_charged_in_the_next_round() {
        let inst = Instance { blocks: 2, covers: vec![vec![0], vec![1], vec![0]], weights: vec![0.0; 3] };
        let calls = [10.0, 0.0, 12.0];
        let m = model(3);
        let params = Params { seed: 3, ..Params::default() };
        let mut rounds_seen = 0;
        let out = select_within(&inst, &calls, &m, 15_000.0, &params, |sel| {
            rounds_seen += 1;
            (0..3).map(|j| j == 0 && sel.contains(&0)).collect()
        })
        .unwrap();
        assert!(out.fits, "{out:?}");
        assert!(out.selection.functions.contains(&2) && !out.selection.functions.contains(&0), "{out:?}");
        assert!(out.prediction.probe_ns_per_s <= 15_000.0);
        assert_eq!((out.rounds, rounds_seen), (2, 2));
    }

    #[test]
    fn a_plan_that_cannot_fit_tightens_the_bound_and_says_so() {
        // Coloring puts everything selected in F^callstack: the bound is tightened until the
        // selection is cheap enough, or the rounds run out.
        let inst = Instance { blocks: 2, covers: vec![vec![0], vec![1]], weights: vec![0.0; 2] };
        let calls = [10.0, 10.0];
        let m = CostModel { emulated: vec![true, true], ..model(2) };
        let out = select_within(&inst, &calls, &m, 35_000.0, &Params::default(), |sel| {
            (0..2).map(|j| sel.contains(&j)).collect()
        })
        .unwrap();
        assert!(out.fits && out.prediction.probe_ns_per_s <= 35_000.0, "{out:?}");
        assert_eq!(out.selection.functions.len(), 1, "only one call-stack function fits: {out:?}");
    }
}
