//! AFCT_GDC (Pham et al., the paper's [2], with AFETM's AFCT data model; sec. IV.B, eq. 14):
//! the database holds, per class (`normal` and every (function, fault kind)), the distinct
//! AFCTs of the training runs' windows under the plan. A window's AFCT t_r gets, per entry, the
//! Gaussian influence exp(-delta(t_r, t_db)^2 / (2 sigma^2)) of the entry's nearest tree (delta:
//! tree edit distance; sigma: the standard deviation of the pairwise distances of all the
//! database's trees). The window is in error when the most influential entry is a fault; the
//! fault entries ranked by influence are the suspects.
//!
//! "Nearest tree" (not a sum over the entry's trees) so that an entry with many distinct trees
//! does not win by number. Faulty windows whose AFCT equals a normal window's are `normal`
//! entries (as in AFETM's training). sigma is estimated on at most [`SIGMA_PAIRS`] pairs; trees
//! are cut to their first [`MAX_NODES`] nodes in preorder, as in FCT_EDC.

use std::{cell::RefCell, collections::HashMap};

use afetm_diagnosis::Class;

use super::edc::{MAX_NODES, capped, key};
use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
    ted::{Labels, TedTree, distance, nearest},
};

/// Pairs sigma is estimated on at most (evenly spread over all pairs of the database's
/// trees): edit distances of near-full trees at large budgets cost tens of ms each.
pub const SIGMA_PAIRS: usize = 600;

/// See the module docs.
pub struct AfctGdc {
    labels: RefCell<Labels>,
    entries: Vec<(Class, Vec<TedTree>)>,
    sigma: f64,
    cache: RefCell<HashMap<String, Vec<(f64, usize)>>>,
}

/// The class of a training window: the run's fault if it reached the window, else normal.
fn window_class(case: &Case, w: &Window) -> Class {
    if w.faulty { case.truth.clone() } else { Class::Normal }
}

impl AfctGdc {
    /// Builds the (fault, AFCTs) database from the training runs in `train`.
    pub fn fit(train: &[Case]) -> Result<AfctGdc, EvalError> {
        let mut labels = Labels::default();
        let mut by_key: HashMap<String, Class> = HashMap::new();
        let mut normal_keys = std::collections::HashSet::new();
        let mut trees: HashMap<String, TedTree> = HashMap::new();
        for c in train {
            for w in &c.windows {
                let Some(t) = &w.afct else { continue };
                let k = key(t);
                let class = window_class(c, w);
                if class == Class::Normal {
                    normal_keys.insert(k.clone());
                }
                if let std::collections::hash_map::Entry::Vacant(e) = trees.entry(k.clone()) {
                    let tt = TedTree::from_proto(&capped(t, MAX_NODES), &mut labels)
                        .ok_or_else(|| EvalError::Input("an AFCT has a node before its parent".into()))?;
                    e.insert(tt);
                }
                by_key.entry(k).or_insert(class);
            }
        }
        let mut grouped: HashMap<Class, Vec<TedTree>> = HashMap::new();
        let mut keys: Vec<&String> = trees.keys().collect();
        keys.sort();
        for k in keys {
            let class = if normal_keys.contains(k) { Class::Normal } else { by_key[k].clone() };
            grouped.entry(class).or_default().push(trees[k].clone());
        }
        if !grouped.contains_key(&Class::Normal) {
            return Err(EvalError::Input("AFCT_GDC: the training runs hold no normal AFCT".into()));
        }
        let mut entries: Vec<(Class, Vec<TedTree>)> = grouped.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let all: Vec<&TedTree> = entries.iter().flat_map(|(_, t)| t).collect();
        let sigma = pairwise_std(&all);
        Ok(AfctGdc { labels: RefCell::new(labels), entries, sigma, cache: RefCell::default() })
    }

    /// The fitted sigma.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Entries and their distinct trees.
    pub fn entries(&self) -> usize {
        self.entries.len()
    }
}

/// Standard deviation of the pairwise edit distances, estimated on at most [`SIGMA_PAIRS`]
/// pairs spread evenly over all of them (1 if there are none or all are equal).
pub fn pairwise_std(trees: &[&TedTree]) -> f64 {
    let n = trees.len();
    let pairs = n * n.saturating_sub(1) / 2;
    let step = pairs.div_ceil(SIGMA_PAIRS).max(1);
    let mut d = Vec::new();
    let mut k = 0usize;
    for i in 0..n {
        for j in i + 1..n {
            if k.is_multiple_of(step) {
                d.push(f64::from(distance(trees[i], trees[j])));
            }
            k += 1;
        }
    }
    if d.is_empty() {
        return 1.0;
    }
    let mean = d.iter().sum::<f64>() / d.len() as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64;
    if var > 0.0 { var.sqrt() } else { 1.0 }
}

/// Eq. 14.
pub fn influence(delta: f64, sigma: f64) -> f64 {
    (-(delta * delta) / (2.0 * sigma * sigma)).exp()
}

impl Method for AfctGdc {
    fn name(&self) -> &str {
        "AFCT_GDC"
    }

    fn input(&self) -> Input {
        Input::Afct
    }

    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError> {
        let Some(afct) = &window.afct else { return Ok(None) };
        let k = key(afct);
        let cached = self.cache.borrow().get(&k).cloned();
        let ranked = match cached {
            Some(r) => r,
            None => {
                let t = TedTree::from_proto(&capped(afct, MAX_NODES), &mut self.labels.borrow_mut())
                    .ok_or_else(|| EvalError::Input("an AFCT has a node before its parent".into()))?;
                let mut r: Vec<(f64, usize)> = Vec::new();
                for (i, (_, trees)) in self.entries.iter().enumerate() {
                    let refs: Vec<&TedTree> = trees.iter().collect();
                    if let Some((d, _)) = nearest(&t, &refs) {
                        r.push((influence(f64::from(d), self.sigma), i));
                    }
                }
                r.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                self.cache.borrow_mut().insert(k, r.clone());
                r
            }
        };
        Ok(Some(verdict(&self.entries, &ranked)))
    }
}

fn verdict(entries: &[(Class, Vec<TedTree>)], ranked: &[(f64, usize)]) -> Verdict {
    let normal = ranked.iter().find(|(_, i)| entries[*i].0 == Class::Normal).map_or(0.0, |r| r.0);
    let faults: Vec<(f64, &Class)> =
        ranked.iter().filter(|(_, i)| entries[*i].0 != Class::Normal).map(|(s, i)| (*s, &entries[*i].0)).collect();
    let best_fault = faults.first().map_or(0.0, |f| f.0);
    let top = faults
        .iter()
        .take(super::afetm::TOP_K)
        .filter_map(|(_, c)| match c {
            Class::Fault { function, kind } => Some(Suspect { function: function.clone(), kind: Some(*kind) }),
            Class::Normal => None,
        })
        .collect();
    Verdict::new(best_fault > normal, normal - best_fault, top)
}
