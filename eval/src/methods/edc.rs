//! FCT_EDC (Wang et al., the paper's [16]; sec. IV.B): full tracing; a window's FCT is in
//! error when its tree edit distance to the nearest normal FCT exceeds a threshold fitted on
//! the training normal runs, and the fault is located where its preorder sequence first
//! departs from that nearest normal FCT's.
//!
//! Threshold: the largest distance from a training normal run's tree to the nearest normal
//! tree of another normal run (what normal variation looks like); a window must be farther
//! than any of those to alarm. Trees larger than [`MAX_NODES`] are cut to their first
//! [`MAX_NODES`] nodes in preorder (the edit distance's memory is quadratic in the size).

use std::{cell::RefCell, collections::HashMap};

use afetm_diagnosis::Class;
use afetm_proto as pb;

use super::preorder;
use crate::{
    EvalError,
    case::{Case, Window},
    method::{Input, Method, Suspect, Verdict},
    ted::{Labels, TedTree, nearest},
};

/// Nodes of a tree compared by edit distance at most (preorder prefix beyond), here and in
/// AFCT_GDC: the distance costs O(n^2 d^2) time and O(n^2) memory.
pub const MAX_NODES: usize = 2000;

/// A tree's identity for caching: its preorder of (function, parent).
pub fn key(tree: &pb::Tree) -> String {
    let mut s = String::new();
    for n in &tree.nodes {
        s.push_str(&n.module);
        s.push(':');
        s.push_str(&n.function);
        s.push('/');
        s.push_str(&n.parent.to_string());
        s.push(';');
    }
    s
}

/// A tree cut to its first `max` nodes in preorder (parents come first, so it stays a tree).
pub fn capped(tree: &pb::Tree, max: usize) -> pb::Tree {
    if tree.nodes.len() <= max {
        return tree.clone();
    }
    let mut t = pb::Tree { nodes: tree.nodes[..max].to_vec(), truncated: true };
    for n in &mut t.nodes {
        n.children.retain(|c| (*c as usize) < max);
    }
    t
}

/// See the module docs.
pub struct FctEdc {
    labels: RefCell<Labels>,
    normals: Vec<(TedTree, pb::Tree)>,
    threshold: u32,
    cache: RefCell<HashMap<String, (u32, usize)>>,
}

impl FctEdc {
    /// Fits on the full FCTs of the training normal runs in `train`.
    pub fn fit(train: &[Case]) -> Result<FctEdc, EvalError> {
        let mut labels = Labels::default();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut normals: Vec<(TedTree, pb::Tree)> = Vec::new();
        // Per normal tree, the runs it occurred in.
        let mut runs_of: Vec<Vec<i64>> = Vec::new();
        for c in train.iter().filter(|c| c.truth == Class::Normal) {
            for tree in c.windows.iter().filter_map(|w| w.full.as_ref()) {
                let tree = capped(tree, MAX_NODES);
                let k = key(&tree);
                let i = *seen.entry(k).or_insert_with(|| {
                    runs_of.push(Vec::new());
                    normals.push((TedTree::from_proto(&tree, &mut labels).unwrap_or_else(empty), tree));
                    normals.len() - 1
                });
                runs_of[i].push(c.run);
            }
        }
        if normals.is_empty() {
            return Err(EvalError::Input("FCT_EDC: no training normal run with a full FCT".into()));
        }
        let mut threshold = 0;
        for (i, (t, _)) in normals.iter().enumerate() {
            let mut runs = runs_of[i].clone();
            runs.dedup();
            for r in runs {
                // The normal trees of the other runs (this one too if it recurs elsewhere).
                let others: Vec<&TedTree> = normals
                    .iter()
                    .zip(&runs_of)
                    .filter(|(_, rs)| rs.iter().any(|x| *x != r))
                    .map(|((o, _), _)| o)
                    .collect();
                if let Some((d, _)) = nearest(t, &others) {
                    threshold = threshold.max(d);
                }
            }
        }
        Ok(FctEdc { labels: RefCell::new(labels), normals, threshold, cache: RefCell::default() })
    }

    /// The fitted threshold (edit operations).
    pub fn threshold(&self) -> u32 {
        self.threshold
    }
}

fn empty() -> TedTree {
    TedTree::from_preorder(&[]).expect("the empty forest is valid")
}

/// Where `run` first departs from `normal` in preorder: up to three distinct suspects, the
/// function at the first differing position of the run (or, if the run ended there, the last
/// one it reached), then the normal tree's function there, then the run's previous function.
pub fn first_difference(run: &[&str], normal: &[&str]) -> Vec<String> {
    let i = run.iter().zip(normal).take_while(|(a, b)| a == b).count();
    if i == run.len() && i == normal.len() {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    let candidates = [run.get(i), normal.get(i), i.checked_sub(1).and_then(|p| run.get(p))];
    for f in candidates.into_iter().flatten() {
        if !out.iter().any(|o| o == f) {
            out.push(f.to_string());
        }
    }
    out
}

impl Method for FctEdc {
    fn name(&self) -> &str {
        "FCT_EDC"
    }

    fn input(&self) -> Input {
        Input::FullFct
    }

    fn window(&self, window: &Window) -> Result<Option<Verdict>, EvalError> {
        let Some(full) = &window.full else { return Ok(None) };
        let tree = capped(full, MAX_NODES);
        let k = key(&tree);
        let cached = self.cache.borrow().get(&k).copied();
        let (d, nearest_i) = match cached {
            Some(hit) => hit,
            None => {
                let t = TedTree::from_proto(&tree, &mut self.labels.borrow_mut())
                    .ok_or_else(|| EvalError::Input("a stored FCT has a node before its parent".into()))?;
                let cands: Vec<&TedTree> = self.normals.iter().map(|(n, _)| n).collect();
                let hit = nearest(&t, &cands).unwrap_or((0, 0));
                self.cache.borrow_mut().insert(k, hit);
                hit
            }
        };
        let error = d > self.threshold;
        let top = if error {
            first_difference(&preorder(&tree), &preorder(&self.normals[nearest_i].1))
                .into_iter()
                .map(|function| Suspect { function, kind: None })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Some(Verdict::new(error, -f64::from(d), top)))
    }
}
