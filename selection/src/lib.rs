//! Trace point selection (crate `afetm-selection`): AFETM sec. III.A, the minimum weighted set cover problem with an
//! upper bound on total weight (MWSCP-UBC, eqs 1-4), solved by the Max-Min Ant System of
//! Algorithm 1 (eqs 5-8).
//!
//! A function `f_j` covers the basic blocks that call it (`h_ij`); its weight `w_j` is its
//! calls per second. The fitness (eq 3) is `F(x) = d1 (1 - covered/n) + d2 sum(x_j w_j)/w_ub`
//! with `d1 = n/(n+1)`, `d2 = 1/(n+1)`: coverage first, weight second; the bound (eq 4) is
//! `sum(x_j w_j) <= w_ub`.
//!
//! Choices where the paper is silent or where we had to make the algorithm usable:
//! - Pheromone is reinforced with the iteration-best solution (Step 3 of the text; eq 7 writes
//!   x^best), and bounded to `[tau_max / l, tau_max]`, `tau_max = tau_ini`.
//! - An ant stops when the bound is reached (Alg. 1 line 8) or when no function is left.
//! - The global best starts from the greedy weighted cover instead of the empty set, so the
//!   result is never worse than greedy (the issue asks for that guarantee).
//! - A stagnation stop: `patience` iterations without a better x^best end the run early.
//! - The roulette wheel (eq 5) uses a Fenwick tree: O(log m) per pick instead of O(m), which
//!   keeps a redis-sized instance well under a second.
//! - Local search, as ACO for set covering usually adds (Algorithm 1 itself has none and its
//!   heuristic, eq 8, looks at weight only): each ant drops functions whose blocks are all
//!   covered by others, and the iteration best is then filled greedily with functions that
//!   still fit and add coverage. Without it MMAS found the exact optimum on 40 of 60 small
//!   random instances; with it on at least 90%.

use rand::{Rng, RngExt, SeedableRng, rngs::StdRng};

pub mod costs;
pub mod infogain;
pub mod weights;

/// The MWSCP-UBC instance: `covers[j]` are the blocks function `j` covers, `weights[j]` its
/// cost (calls per second), `blocks` the size of B.
#[derive(Clone, Debug)]
pub struct Instance {
    pub blocks: usize,
    pub covers: Vec<Vec<u32>>,
    pub weights: Vec<f64>,
}

/// Parameters of Algorithm 1, with the paper's symbols.
#[derive(Clone, Debug)]
pub struct Params {
    /// N_ant: ants per iteration.
    pub ants: usize,
    /// N_run: iterations.
    pub runs: usize,
    /// alpha: weight of pheromone in eq 5.
    pub alpha: f64,
    /// beta: weight of the heuristic in eq 5.
    pub beta: f64,
    /// rho: evaporation, in (0, 1).
    pub rho: f64,
    /// tau_ini: initial pheromone, also tau_max.
    pub tau_ini: f64,
    /// eta_max: heuristic of a zero-weight function (eq 8), > 1.
    pub eta_max: f64,
    /// Q: total pheromone deposited (eq 7).
    pub q: f64,
    /// l: tau_min = tau_max / l, l > 1.
    pub l: f64,
    /// Stop after this many iterations without a better x^best (0 = always run N_run).
    pub patience: usize,
    pub seed: u64,
}

impl Default for Params {
    /// The paper gives no values for these; ours are usual MMAS magnitudes, chosen so a
    /// redis-sized selection stays well under a second (`cargo xtask bench select`) while small
    /// instances still reach the exact optimum (the selection tests).
    fn default() -> Self {
        Params {
            ants: 10,
            runs: 50,
            alpha: 1.0,
            beta: 2.0,
            rho: 0.1,
            tau_ini: 1.0,
            eta_max: 10.0,
            q: 1.0,
            l: 50.0,
            patience: 20,
            seed: 1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectionError {
    #[error("covers and weights differ in length ({0} vs {1})")]
    Shape(usize, usize),
    #[error("function {0} covers block {1}, outside 0..{2}")]
    Block(usize, u32, usize),
    #[error("weight of function {0} is {1}; weights must be finite and >= 0")]
    Weight(usize, f64),
    #[error("bad parameter: {0}")]
    Param(&'static str),
}

/// A solution x of MWSCP-UBC.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// Indices of the selected functions, ascending.
    pub functions: Vec<usize>,
    pub covered: usize,
    pub weight: f64,
    /// F(x), eq 3.
    pub fitness: f64,
}

impl Instance {
    pub fn check(&self) -> Result<(), SelectionError> {
        if self.covers.len() != self.weights.len() {
            return Err(SelectionError::Shape(self.covers.len(), self.weights.len()));
        }
        for (j, c) in self.covers.iter().enumerate() {
            if let Some(b) = c.iter().find(|b| **b as usize >= self.blocks) {
                return Err(SelectionError::Block(j, *b, self.blocks));
            }
            let w = self.weights[j];
            if !w.is_finite() || w < 0.0 {
                return Err(SelectionError::Weight(j, w));
            }
        }
        Ok(())
    }

    pub fn total_weight(&self) -> f64 {
        self.weights.iter().sum()
    }

    /// Eq 3.
    pub fn fitness(&self, covered: usize, weight: f64, w_ub: f64) -> f64 {
        let n = self.blocks as f64;
        let (d1, d2) = (n / (n + 1.0), 1.0 / (n + 1.0));
        let cov = if self.blocks == 0 { 1.0 } else { covered as f64 / n };
        d1 * (1.0 - cov) + d2 * if w_ub > 0.0 { weight / w_ub } else { 0.0 }
    }

    /// Evaluates a set of functions (eqs 1-3).
    pub fn evaluate(&self, functions: &[usize], w_ub: f64) -> Selection {
        let mut hit = vec![false; self.blocks];
        let mut covered = 0;
        let mut weight = 0.0;
        for &j in functions {
            weight += self.weights[j];
            for &b in &self.covers[j] {
                if !hit[b as usize] {
                    hit[b as usize] = true;
                    covered += 1;
                }
            }
        }
        let mut functions = functions.to_vec();
        functions.sort_unstable();
        functions.dedup();
        Selection { fitness: self.fitness(covered, weight, w_ub), functions, covered, weight }
    }
}

/// The budget as the user gives it: P = w_ub / w_total (the paper's 10%, 30%, 50%).
pub fn bound_for(instance: &Instance, p: f64) -> f64 {
    p * instance.total_weight()
}

/// Greedy weighted set cover under the bound: repeatedly the function with the most newly
/// covered blocks per unit of weight (zero-weight functions first) that still fits.
pub fn greedy(instance: &Instance, w_ub: f64) -> Selection {
    instance.evaluate(&fill(instance, Vec::new(), w_ub), w_ub)
}

/// Exhaustive optimum for small instances (at most 24 functions); for tests and reports.
pub fn exhaustive(instance: &Instance, w_ub: f64) -> Option<Selection> {
    let m = instance.covers.len();
    if m > 24 {
        return None;
    }
    let mut best: Option<Selection> = None;
    for mask in 0u32..(1u32 << m) {
        let funcs: Vec<usize> = (0..m).filter(|j| mask & (1 << j) != 0).collect();
        let w: f64 = funcs.iter().map(|j| instance.weights[*j]).sum();
        if w > w_ub {
            continue;
        }
        let s = instance.evaluate(&funcs, w_ub);
        if best.as_ref().is_none_or(|b| s.fitness < b.fitness) {
            best = Some(s);
        }
    }
    best
}

/// Fenwick tree over roulette-wheel weights: pick proportional to weight, update in O(log m).
struct Wheel {
    tree: Vec<f64>,
    values: Vec<f64>,
}

impl Wheel {
    fn new(values: &[f64]) -> Wheel {
        let n = values.len();
        let mut tree = vec![0.0; n + 1];
        for (i, v) in values.iter().enumerate() {
            let mut k = i + 1;
            while k <= n {
                tree[k] += v;
                k += k & k.wrapping_neg();
            }
        }
        Wheel { tree, values: values.to_vec() }
    }

    fn set(&mut self, i: usize, v: f64) {
        let d = v - self.values[i];
        self.values[i] = v;
        let mut k = i + 1;
        while k < self.tree.len() {
            self.tree[k] += d;
            k += k & k.wrapping_neg();
        }
    }

    fn total(&self) -> f64 {
        let mut k = self.tree.len() - 1;
        let mut s = 0.0;
        while k > 0 {
            s += self.tree[k];
            k -= k & k.wrapping_neg();
        }
        s
    }

    /// Index whose cumulative range contains `r` (0 <= r < total).
    fn find(&self, mut r: f64) -> usize {
        let n = self.tree.len() - 1;
        let mut pos = 0;
        let mut step = n.next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= n && self.tree[next] <= r {
                r -= self.tree[next];
                pos = next;
            }
            step >>= 1;
        }
        // Skip zero-weight slots that rounding may land on.
        let mut i = pos.min(n - 1);
        while self.values[i] <= 0.0 && i + 1 < n {
            i += 1;
        }
        i
    }
}

/// Algorithm 1: MMAS based trace points selection. Returns x^best and F(x^best).
pub fn mmas(instance: &Instance, w_ub: f64, p: &Params) -> Result<Selection, SelectionError> {
    instance.check()?;
    if !(p.rho > 0.0 && p.rho < 1.0) {
        return Err(SelectionError::Param("rho must be in (0, 1)"));
    }
    if p.l <= 1.0 || p.eta_max <= 1.0 || p.tau_ini <= 0.0 || p.ants == 0 || p.q <= 0.0 {
        return Err(SelectionError::Param("need l > 1, eta_max > 1, tau_ini > 0, Q > 0, N_ant > 0"));
    }
    if !(w_ub.is_finite() && w_ub >= 0.0) {
        return Err(SelectionError::Param("w_ub must be finite and >= 0"));
    }
    let m = instance.covers.len();
    let mut rng = StdRng::seed_from_u64(p.seed);
    let (tau_max, tau_min) = (p.tau_ini, p.tau_ini / p.l);
    let mut tau = vec![p.tau_ini; m];
    // eq 8: eta_j = 1/w_j, or eta_max for a function that costs nothing.
    let eta: Vec<f64> = instance.weights.iter().map(|w| if *w == 0.0 { p.eta_max } else { 1.0 / w }).collect();
    let mut best = greedy(instance, w_ub);
    let mut hit_epoch = vec![0u32; instance.blocks];
    let mut scratch = vec![0u32; instance.blocks];
    let mut epoch = 0u32;
    let mut since_better = 0usize;
    for _ in 0..p.runs {
        let attractiveness: Vec<f64> = (0..m).map(|j| tau[j].powf(p.alpha) * eta[j].powf(p.beta)).collect();
        let mut iteration_best: Option<Selection> = None;
        for _ in 0..p.ants {
            let mut wheel = Wheel::new(&attractiveness);
            let mut picked = Vec::new();
            let mut w_total = 0.0;
            let mut covered = 0usize;
            epoch += 1;
            // Lines 6-12: roulette-wheel picks until the bound is reached. At most m picks: the
            // wheel's float sums can keep a rounding residue after every function is taken.
            let mut picks = 0usize;
            while (w_total < w_ub || (w_ub == 0.0 && w_total == 0.0)) && picks < m {
                picks += 1;
                let total = wheel.total();
                if total <= 0.0 {
                    break; // nothing left to pick
                }
                let j = wheel.find(rng.random::<f64>() * total);
                w_total += instance.weights[j];
                wheel.set(j, 0.0);
                if w_total <= w_ub {
                    picked.push(j);
                    for &b in &instance.covers[j] {
                        if hit_epoch[b as usize] != epoch {
                            hit_epoch[b as usize] = epoch;
                            covered += 1;
                        }
                    }
                } else {
                    break;
                }
            }
            let _ = covered;
            let candidate = drop_redundant(instance, picked, &mut scratch, w_ub);
            if iteration_best.as_ref().is_none_or(|b| candidate.fitness < b.fitness) {
                iteration_best = Some(candidate);
            }
        }
        let Some(ib) = iteration_best else { break };
        let ib = instance.evaluate(&fill(instance, ib.functions, w_ub), w_ub);
        // eqs 6-7 with the iteration best, then the MMAS bounds.
        let in_ib: Vec<bool> = {
            let mut v = vec![false; m];
            for &j in &ib.functions {
                v[j] = true;
            }
            v
        };
        let f = ib.fitness.max(1e-12);
        for j in 0..m {
            let delta = if in_ib[j] { p.q / (p.ants as f64 * f * tau[j]) } else { 0.0 };
            tau[j] = ((1.0 - p.rho) * tau[j] + delta).clamp(tau_min, tau_max);
        }
        if ib.fitness < best.fitness {
            best = ib;
            since_better = 0;
        } else {
            since_better += 1;
            if p.patience > 0 && since_better >= p.patience {
                break; // stagnation
            }
        }
    }
    best.functions.sort_unstable();
    Ok(best)
}

/// Removes functions every block of which another selected function covers too, heaviest
/// first (each removal lowers the weight and keeps the coverage). `count` is all zeros on entry
/// and on return (scratch reused across ants). Returns the evaluated selection.
fn drop_redundant(instance: &Instance, mut picked: Vec<usize>, count: &mut [u32], w_ub: f64) -> Selection {
    for &j in &picked {
        for &b in &instance.covers[j] {
            count[b as usize] += 1;
        }
    }
    let touched: Vec<usize> = picked.clone();
    picked.sort_by(|a, b| instance.weights[*b].total_cmp(&instance.weights[*a]));
    picked.retain(|&j| {
        let redundant = instance.covers[j].iter().all(|b| count[*b as usize] >= 2);
        if redundant {
            for &b in &instance.covers[j] {
                count[b as usize] -= 1;
            }
        }
        !redundant
    });
    // Count covered blocks once each while resetting the scratch.
    let mut covered = 0;
    for &j in &touched {
        for &b in &instance.covers[j] {
            if count[b as usize] > 0 {
                covered += 1;
            }
            count[b as usize] = 0;
        }
    }
    let weight: f64 = picked.iter().map(|j| instance.weights[*j]).sum();
    picked.sort_unstable();
    Selection { fitness: instance.fitness(covered, weight, w_ub), functions: picked, covered, weight }
}

/// Adds, best gain per weight first, functions that still fit the bound and cover new blocks.
/// Lazy greedy: a function's gain only ever drops, so a heap entry whose recomputed score still
/// beats the next one is the true best (O(total cover x log m) instead of O(picks x m)).
fn fill(instance: &Instance, mut picked: Vec<usize>, w_ub: f64) -> Vec<usize> {
    use std::{cmp::Ordering, collections::BinaryHeap};
    #[derive(PartialEq)]
    struct Entry(f64, f64, usize); // score, -weight (ties: lighter first), function
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Entry {
        fn cmp(&self, o: &Self) -> Ordering {
            self.0.total_cmp(&o.0).then(self.1.total_cmp(&o.1)).then(o.2.cmp(&self.2))
        }
    }
    let score = |gain: usize, w: f64| if w == 0.0 { f64::INFINITY } else { gain as f64 / w };
    let mut hit = vec![false; instance.blocks];
    let mut chosen = vec![false; instance.covers.len()];
    let mut weight = 0.0;
    for &j in &picked {
        chosen[j] = true;
        weight += instance.weights[j];
        for &b in &instance.covers[j] {
            hit[b as usize] = true;
        }
    }
    let gain_of = |j: usize, hit: &[bool]| instance.covers[j].iter().filter(|b| !hit[**b as usize]).count();
    let mut heap: BinaryHeap<Entry> = (0..instance.covers.len())
        .filter(|&j| !chosen[j])
        .filter_map(|j| {
            let g = gain_of(j, &hit);
            (g > 0).then(|| Entry(score(g, instance.weights[j]), -instance.weights[j], j))
        })
        .collect();
    while let Some(Entry(_, _, j)) = heap.pop() {
        let w = instance.weights[j];
        if weight + w > w_ub {
            continue; // the budget only shrinks: it never fits later
        }
        let g = gain_of(j, &hit);
        if g == 0 {
            continue;
        }
        let fresh = Entry(score(g, w), -w, j);
        if heap.peek().is_some_and(|top| *top > fresh) {
            heap.push(fresh); // stale: re-queue with its current score
            continue;
        }
        chosen[j] = true;
        weight += w;
        for &b in &instance.covers[j] {
            hit[b as usize] = true;
        }
        picked.push(j);
    }
    picked
}

/// Random instance for tests and benchmarks: `m` functions over `n` blocks, each block covered
/// by 1-3 functions, weights log-uniform over four decades with some zero.
pub fn random_instance(n: usize, m: usize, rng: &mut impl Rng) -> Instance {
    let mut covers = vec![Vec::new(); m];
    for b in 0..n {
        let k = rng.random_range(1..=3usize.min(m.max(1)));
        for _ in 0..k {
            let j = rng.random_range(0..m);
            if !covers[j].contains(&(b as u32)) {
                covers[j].push(b as u32);
            }
        }
    }
    let weights =
        (0..m).map(|_| if rng.random_bool(0.1) { 0.0 } else { 10f64.powf(rng.random_range(0.0..4.0)) }).collect();
    Instance { blocks: n, covers, weights }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fitness_prefers_coverage_then_weight() {
        let inst = Instance {
            blocks: 4,
            covers: vec![vec![0, 1], vec![2, 3], vec![0, 1, 2, 3]],
            weights: vec![1.0, 1.0, 5.0],
        };
        let all = inst.evaluate(&[2], 10.0);
        let two = inst.evaluate(&[0, 1], 10.0);
        assert_eq!((all.covered, two.covered), (4, 4));
        assert!(two.fitness < all.fitness, "same coverage, less weight wins");
        let half = inst.evaluate(&[0], 10.0);
        assert!(all.fitness < half.fitness, "coverage dominates weight");
        assert_eq!(mmas(&inst, 10.0, &Params::default()).unwrap().functions, vec![0, 1]);
        // With a bound of 1 only one of the cheap ones fits.
        let s = mmas(&inst, 1.0, &Params::default()).unwrap();
        assert_eq!((s.covered, s.weight), (2, 1.0));
    }

    #[test]
    fn bad_input_is_refused() {
        let inst = Instance { blocks: 2, covers: vec![vec![5]], weights: vec![1.0] };
        assert_eq!(mmas(&inst, 1.0, &Params::default()), Err(SelectionError::Block(0, 5, 2)));
        let inst = Instance { blocks: 2, covers: vec![vec![0]], weights: vec![f64::NAN] };
        assert!(matches!(mmas(&inst, 1.0, &Params::default()), Err(SelectionError::Weight(0, _))));
        let inst = Instance { blocks: 2, covers: vec![vec![0]], weights: vec![1.0] };
        assert!(mmas(&inst, 1.0, &Params { rho: 1.5, ..Params::default() }).is_err());
    }

    #[test]
    fn wheel_picks_in_proportion_and_never_picks_removed() {
        let mut w = Wheel::new(&[1.0, 0.0, 3.0, 0.0]);
        assert_eq!(w.total(), 4.0);
        assert_eq!(w.find(0.5), 0);
        assert_eq!(w.find(1.5), 2);
        assert_eq!(w.find(3.99), 2);
        w.set(2, 0.0);
        assert_eq!(w.total(), 1.0);
        assert_eq!(w.find(0.99), 0);
    }

    /// On random instances small enough for an exact answer MMAS finds the optimum on almost
    /// all, and is never worse than greedy.
    #[test]
    fn mmas_reaches_the_optimum_on_small_instances() {
        let mut rng = StdRng::seed_from_u64(7);
        let (mut optimal, mut total) = (0, 0);
        for case in 0..60 {
            let m = rng.random_range(6..=16);
            let n = rng.random_range(8..=40);
            let inst = random_instance(n, m, &mut rng);
            let w_ub = bound_for(&inst, [0.1, 0.3, 0.5][case % 3]);
            let best = exhaustive(&inst, w_ub).unwrap();
            let g = greedy(&inst, w_ub);
            let s = mmas(&inst, w_ub, &Params { seed: case as u64, ..Params::default() }).unwrap();
            assert!(s.weight <= w_ub + 1e-9);
            assert!(s.fitness <= g.fitness + 1e-12, "case {case}: MMAS {} worse than greedy {}", s.fitness, g.fitness);
            assert!(s.fitness >= best.fitness - 1e-12);
            total += 1;
            if (s.fitness - best.fitness).abs() < 1e-12 {
                optimal += 1;
            }
        }
        eprintln!("MMAS found the exact optimum on {optimal} of {total} instances");
        assert!(optimal * 100 >= total * 90, "optimum on {optimal} of {total}");
    }

    proptest! {
        /// Every plan respects eq 4 and reports its own coverage and weight truthfully.
        #[test]
        fn plans_respect_the_bound(seed in 0u64..1000, m in 1usize..30, n in 1usize..60, p in 0.0f64..1.0) {
            let mut rng = StdRng::seed_from_u64(seed);
            let inst = random_instance(n, m, &mut rng);
            let w_ub = bound_for(&inst, p);
            let s = mmas(&inst, w_ub, &Params { runs: 10, ants: 5, seed, ..Params::default() }).unwrap();
            prop_assert!(s.weight <= w_ub + 1e-9);
            let again = inst.evaluate(&s.functions, w_ub);
            prop_assert_eq!(again.covered, s.covered);
            prop_assert!((again.weight - s.weight).abs() < 1e-9);
        }
    }
}
