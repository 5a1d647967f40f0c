//! Tree edit distance (Zhang and Shasha, 1989) with unit costs: insert, delete and relabel of
//! one node each cost 1. Used by the FCT_EDC and AFCT_GDC baselines (sec. IV.B), which both
//! compare call trees by edit distance.
//!
//! Written here rather than taken from a crate: the crates found (`tree-edit-distance`,
//! `zhang-shasha`-style ports) are either generic over owned node graphs that would copy every
//! FCT again, or unmaintained; the algorithm is 60 lines over flat postorder arrays. It is
//! tested against the recursive definition on random small forests (`tests/ted.rs`).
//!
//! Forests are compared as trees under one virtual root (a label no function has), so a
//! thread's several roots count like children.

use std::collections::HashMap;

use afetm_proto as pb;

/// A tree prepared for edit distance: labels in postorder and each node's leftmost leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TedTree {
    /// Label of node `i` in postorder (the virtual root last).
    labels: Vec<u32>,
    /// Postorder index of node `i`'s leftmost leaf descendant.
    leftmost: Vec<usize>,
    /// Keyroots, ascending: the highest node of each distinct leftmost leaf.
    keyroots: Vec<usize>,
    /// How many nodes carry each label (for the lower bound).
    histogram: HashMap<u32, u32>,
}

/// Label of the virtual root that joins a forest's trees.
pub const VIRTUAL_ROOT: u32 = u32::MAX;

/// Interns function names as labels, shared by all trees compared with each other.
#[derive(Debug, Default, Clone)]
pub struct Labels(HashMap<(String, String), u32>);

impl Labels {
    /// The label of a function.
    pub fn of(&mut self, module: &str, function: &str) -> u32 {
        let next = self.0.len() as u32;
        *self.0.entry((module.to_string(), function.to_string())).or_insert(next)
    }
}

impl TedTree {
    /// Builds from a forest given as (label, parent) in preorder (parent `None` for a root);
    /// parents must come before their children. Returns `None` if a parent index is not an
    /// earlier node.
    pub fn from_preorder(nodes: &[(u32, Option<usize>)]) -> Option<TedTree> {
        let mut children: Vec<Vec<usize>> = vec![Vec::new(); nodes.len() + 1];
        let root = nodes.len();
        for (i, (_, parent)) in nodes.iter().enumerate() {
            match parent {
                Some(p) if *p < i => children[*p].push(i),
                Some(_) => return None,
                None => children[root].push(i),
            }
        }
        let label = |i: usize| if i == root { VIRTUAL_ROOT } else { nodes[i].0 };
        let (mut labels, mut leftmost) = (Vec::with_capacity(root + 1), Vec::with_capacity(root + 1));
        // Iterative postorder: (node, next child to visit).
        let mut stack = vec![(root, 0usize)];
        let mut first_leaf: Vec<usize> = vec![usize::MAX; root + 1];
        while let Some((n, k)) = stack.pop() {
            if k < children[n].len() {
                stack.push((n, k + 1));
                stack.push((children[n][k], 0));
                continue;
            }
            let me = labels.len();
            let lm = children[n].first().map_or(me, |c| first_leaf[*c]);
            first_leaf[n] = lm;
            labels.push(label(n));
            leftmost.push(lm);
        }
        let mut highest: HashMap<usize, usize> = HashMap::new();
        for (i, l) in leftmost.iter().enumerate() {
            highest.insert(*l, i);
        }
        let mut keyroots: Vec<usize> = highest.into_values().collect();
        keyroots.sort_unstable();
        let mut histogram = HashMap::new();
        for l in &labels {
            *histogram.entry(*l).or_insert(0) += 1;
        }
        Some(TedTree { labels, leftmost, keyroots, histogram })
    }

    /// Builds from a wire tree (AFCT or FCT), labelling nodes by (module, function).
    pub fn from_proto(tree: &pb::Tree, labels: &mut Labels) -> Option<TedTree> {
        let nodes: Vec<(u32, Option<usize>)> =
            tree.nodes.iter().map(|n| (labels.of(&n.module, &n.function), usize::try_from(n.parent).ok())).collect();
        TedTree::from_preorder(&nodes)
    }

    /// Nodes, the virtual root included.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Never true: the virtual root is always there.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// A lower bound of [`distance`]: the size difference, and half the labels one tree has
    /// more of than the other (a relabel fixes one on each side, an insert or delete one).
    pub fn lower_bound(&self, other: &TedTree) -> u32 {
        let mut diff = 0u32;
        for (l, n) in &self.histogram {
            diff += n.abs_diff(*other.histogram.get(l).unwrap_or(&0));
        }
        for (l, n) in &other.histogram {
            if !self.histogram.contains_key(l) {
                diff += n;
            }
        }
        (self.len().abs_diff(other.len()) as u32).max(diff.div_ceil(2))
    }
}

/// The unit-cost edit distance between two trees (Zhang-Shasha keyroot dynamic programme,
/// O(|a| |b| min(depth, leaves)^2) time, O(|a| |b|) memory).
pub fn distance(a: &TedTree, b: &TedTree) -> u32 {
    let (n, m) = (a.len(), b.len());
    let mut td = vec![0u32; n * m];
    // Forest distance scratch, (n+1) x (m+1), indexed relative to the keyroots' leftmost leaves.
    let mut fd = vec![0u32; (n + 1) * (m + 1)];
    for &i in &a.keyroots {
        for &j in &b.keyroots {
            forest_distance(a, b, i, j, &mut td, &mut fd);
        }
    }
    td[(n - 1) * m + (m - 1)]
}

fn forest_distance(a: &TedTree, b: &TedTree, i: usize, j: usize, td: &mut [u32], fd: &mut [u32]) {
    let m = b.len();
    let (li, lj) = (a.leftmost[i], b.leftmost[j]);
    let (rows, cols) = (i - li + 2, j - lj + 2);
    let at = |x: usize, y: usize| x * cols + y;
    fd[at(0, 0)] = 0;
    for x in 1..rows {
        fd[at(x, 0)] = fd[at(x - 1, 0)] + 1;
    }
    for y in 1..cols {
        fd[at(0, y)] = fd[at(0, y - 1)] + 1;
    }
    for x in 1..rows {
        let ai = li + x - 1;
        for y in 1..cols {
            let bj = lj + y - 1;
            let del = fd[at(x - 1, y)] + 1;
            let ins = fd[at(x, y - 1)] + 1;
            let v = if a.leftmost[ai] == li && b.leftmost[bj] == lj {
                let rel = fd[at(x - 1, y - 1)] + u32::from(a.labels[ai] != b.labels[bj]);
                let v = del.min(ins).min(rel);
                td[ai * m + bj] = v;
                v
            } else {
                let (px, py) = (a.leftmost[ai] - li, b.leftmost[bj] - lj);
                del.min(ins).min(fd[at(px, py)] + td[ai * m + bj])
            };
            fd[at(x, y)] = v;
        }
    }
}

/// The distance and the index of the nearest of `candidates` to `tree`, or `None` when there
/// are none. Candidates are tried in order of their [`TedTree::lower_bound`] and the search
/// stops once the bound reaches the best distance found (the answer is exact).
pub fn nearest(tree: &TedTree, candidates: &[&TedTree]) -> Option<(u32, usize)> {
    let mut order: Vec<(u32, usize)> = candidates.iter().enumerate().map(|(k, c)| (tree.lower_bound(c), k)).collect();
    order.sort_unstable();
    let mut best: Option<(u32, usize)> = None;
    for (bound, k) in order {
        if best.is_some_and(|(d, _)| bound >= d) {
            break;
        }
        let d = distance(tree, candidates[k]);
        if best.is_none_or(|(b, _)| d < b) {
            best = Some((d, k));
        }
    }
    best
}
