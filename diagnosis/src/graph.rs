//! From a call tree to the GCN's input graph: normalization, node features, and batches of
//! many graphs as one disjoint union.
//!
//! The input is the wire form of a tree ([`pb::Tree`]): an AFCT (Alg. 3) at run time, or a
//! colored FCT with its red nodes masked (Alg. 2) in training. Both go through
//! [`Graph::from_tree`], so the model sees the same kind of graph in both places.
//!
//! **Trunk trimming.** An AFCT's blue ancestors come from call stacks and reach the outermost
//! frame (`__libc_start_call_main -> main -> aeMain -> ...`); a window of a full-trace FCT
//! starts inside the event loop (`aeMain` is its root). Both shapes carry the same information
//! below the first node that branches or is traced, so every root chain of blue nodes with a
//! single child is dropped before features are taken: without it the same thread would sit
//! two levels deeper at run time than in training.
//!
//! **Node features** (nothing scales with the request rate: the campaign drives a low fixed
//! rate, production runs at full load): the function's vocabulary index (an embedding row in
//! the model; [`UNKNOWN`] for functions the model never saw), white / blue one-hot, the node's
//! share of the tree's calls (traced nodes only: blue nodes of an AFCT carry no count) and its
//! square root, and its depth below the trimmed roots
//! (divided by [`DEPTH_SCALE`], capped at 1); then its [`DEVIATION`] features against the
//! model's normal profile (new edge, new function, always-called children missing, call share
//! out of the normal range: [`crate::profile`]). `calls` on a node counts its (caller, callee)
//! edge in that thread, not its calling context (afetm folds recursion), so the share is one of
//! that edge's calls.

use std::collections::HashMap;

use afetm_proto::v1 as pb;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    DiagnosisError,
    profile::{DEVIATION, NormalProfile, TreeView},
};

/// Vocabulary row of every function the model does not know.
pub const UNKNOWN: u32 = 0;
/// Dense features per node from the tree alone (white, blue, share, sqrt(share), depth).
pub const TREE_DENSE: usize = 5;
/// Number of dense features per node: the tree's, then the deviation from the normal profile
/// ([`crate::profile`]).
pub const DENSE: usize = TREE_DENSE + DEVIATION;
/// Depth at which the depth feature saturates.
pub const DEPTH_SCALE: f32 = 32.0;

/// The functions a model knows, as `module` and `name`; row `i + 1` of the embedding is entry
/// `i` (row 0 is [`UNKNOWN`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    functions: Vec<(String, String)>,
    #[serde(skip)]
    index: HashMap<(String, String), u32>,
}

impl Vocab {
    /// A vocabulary of `functions` (module, name), deduplicated, in order of first appearance.
    pub fn new(functions: impl IntoIterator<Item = (String, String)>) -> Vocab {
        let mut v = Vocab::default();
        for f in functions {
            v.insert(f);
        }
        v
    }

    fn insert(&mut self, f: (String, String)) {
        if !self.index.contains_key(&f) {
            self.index.insert(f.clone(), self.functions.len() as u32 + 1);
            self.functions.push(f);
        }
    }

    /// Rebuilds the lookup index after deserialization.
    pub(crate) fn reindex(&mut self) {
        let functions = std::mem::take(&mut self.functions);
        *self = Vocab::new(functions);
    }

    /// The row of a function, [`UNKNOWN`] if absent.
    pub fn row(&self, module: &str, name: &str) -> u32 {
        // Allocation-free lookup would need a borrowed key type; trees are small enough.
        self.index.get(&(module.to_string(), name.to_string())).copied().unwrap_or(UNKNOWN)
    }

    /// Embedding rows including [`UNKNOWN`].
    pub fn rows(&self) -> usize {
        self.functions.len() + 1
    }

    /// The functions in row order (row `i + 1` is entry `i`).
    pub fn functions(&self) -> &[(String, String)] {
        &self.functions
    }
}

/// One tree as the model's input: nodes with their vocabulary row and dense features, and the
/// tree's edges (child, parent) as indexes into the nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// Vocabulary row per node.
    pub rows: Vec<u32>,
    /// [`DENSE`] features per node, row-major.
    pub dense: Vec<f32>,
    /// (child, parent) per tree edge.
    pub edges: Vec<(u32, u32)>,
    /// Index of each kept node in the input tree (for pointing back at it).
    pub source: Vec<u32>,
}

impl Graph {
    /// Normalizes `tree` (trunk trimming, see the module docs) and takes its features, the
    /// deviation from `normal` among them. Red nodes are masked here as well, so a colored FCT
    /// can be passed as it is. Errors on a malformed tree (a parent that is not an earlier
    /// node) and on an empty one.
    pub fn from_tree(tree: &pb::Tree, vocab: &Vocab, normal: &NormalProfile) -> Result<Graph, DiagnosisError> {
        let n = tree.nodes.len();
        let mut parent: Vec<Option<usize>> = Vec::with_capacity(n);
        for (i, node) in tree.nodes.iter().enumerate() {
            match node.parent {
                -1 => parent.push(None),
                p if p >= 0 && (p as usize) < i => parent.push(Some(p as usize)),
                p => {
                    return Err(DiagnosisError::BadTree(format!(
                        "node {i} ({}) has parent {p}, not an earlier node of the {n}",
                        node.function
                    )));
                }
            }
        }
        let keep = kept(tree, &parent);
        let deviation = normal.features(&TreeView::of(tree));
        let mut new_index = vec![u32::MAX; n];
        let mut g = Graph { rows: Vec::new(), dense: Vec::new(), edges: Vec::new(), source: Vec::new() };
        let mut depth = vec![0u32; n];
        let white = |i: usize| tree.nodes[i].color == pb::Color::White as i32;
        // Only traced nodes' calls count: an AFCT's blue nodes come from call stacks and carry
        // none, while a masked FCT's blue nodes still hold their full-trace counts.
        let calls = |i: usize| if white(i) { tree.nodes[i].calls } else { 0 };
        let total: u64 = (0..n).filter(|i| keep[*i]).map(calls).sum();
        for i in (0..n).filter(|i| keep[*i]) {
            let node = &tree.nodes[i];
            let up = parent[i].filter(|p| keep[*p]);
            if let Some(p) = up {
                depth[i] = depth[p] + 1;
                g.edges.push((g.rows.len() as u32, new_index[p]));
            }
            new_index[i] = g.rows.len() as u32;
            g.source.push(i as u32);
            g.rows.push(vocab.row(&node.module, &node.function));
            let share = if total == 0 { 0.0 } else { calls(i) as f32 / total as f32 };
            g.dense.extend([
                white(i) as u8 as f32,
                !white(i) as u8 as f32,
                share,
                share.sqrt(),
                (depth[i] as f32 / DEPTH_SCALE).min(1.0),
            ]);
            g.dense.extend(deviation[i]);
        }
        if g.rows.is_empty() {
            return Err(DiagnosisError::BadTree("the tree has no traced or recovered node".into()));
        }
        Ok(g)
    }

    /// Nodes.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Never true for a graph made by [`Graph::from_tree`].
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Which nodes survive masking (red out) and trunk trimming (single-child blue root chains out).
fn kept(tree: &pb::Tree, parent: &[Option<usize>]) -> Vec<bool> {
    let n = tree.nodes.len();
    let red = |i: usize| tree.nodes[i].color == pb::Color::Red as i32;
    // A node is kept unless red or under a red node (a masked tree has no such nodes).
    let mut keep: Vec<bool> = vec![true; n];
    for i in 0..n {
        keep[i] = !red(i) && parent[i].is_none_or(|p| keep[p]);
    }
    let mut children = vec![0u32; n];
    for i in (0..n).filter(|i| keep[*i]) {
        if let Some(p) = parent[i] {
            children[p] += 1;
        }
    }
    // Preorder: a parent is decided before its children, so a chain is dropped top-down.
    let mut dropped = vec![false; n];
    for i in (0..n).filter(|i| keep[*i]) {
        let is_root = parent[i].is_none_or(|p| dropped[p]);
        let blue = tree.nodes[i].color == pb::Color::Blue as i32;
        if is_root && blue && children[i] == 1 {
            dropped[i] = true;
        }
    }
    (0..n).map(|i| keep[i] && !dropped[i]).collect()
}

/// Many graphs as one disjoint union, as tensors for [`crate::gcn::Gcn::forward`].
#[derive(Debug)]
pub struct Batch {
    /// Vocabulary row per node, `[N]` u32.
    pub rows: Tensor,
    /// Dense features, `[N, DENSE]`.
    pub dense: Tensor,
    /// Message source per entry of Â (eq. 10), `[E]` u32, self loops included.
    pub src: Tensor,
    /// Message destination per entry of Â, `[E]` u32.
    pub dst: Tensor,
    /// Â's value D^-1/2 (A + I) D^-1/2 per entry, `[E, 1]`.
    pub norm: Tensor,
    /// Graph of each node, `[N]` u32.
    pub graph_of: Tensor,
    /// 1 / nodes per graph, `[G, 1]`.
    pub inv_len: Tensor,
    /// Node index per (graph, slot), padded with N (a zero row), `[G * max_len]` u32.
    pub padded: Tensor,
    /// Graphs.
    pub graphs: usize,
    /// Nodes of the largest graph.
    pub max_len: usize,
}

impl Batch {
    /// The disjoint union of `graphs`; `rows` overrides their vocabulary rows (for the
    /// unknown-function dropout of training) when given, in node order.
    pub fn new(graphs: &[&Graph], rows: Option<Vec<u32>>, device: &Device) -> Result<Batch, DiagnosisError> {
        let total: usize = graphs.iter().map(|g| g.len()).sum();
        let max_len = graphs.iter().map(|g| g.len()).max().unwrap_or(0);
        let mut all_rows = Vec::with_capacity(total);
        let mut dense = Vec::with_capacity(total * DENSE);
        let (mut src, mut dst, mut norm) = (Vec::new(), Vec::new(), Vec::new());
        let mut graph_of = Vec::with_capacity(total);
        let mut inv_len = Vec::with_capacity(graphs.len());
        let mut padded = vec![total as u32; graphs.len() * max_len];
        let mut base = 0u32;
        for (gi, g) in graphs.iter().enumerate() {
            all_rows.extend_from_slice(&g.rows);
            dense.extend_from_slice(&g.dense);
            // Degree with the self loop (eq. 10's D of A + I), edges taken both ways.
            let mut deg = vec![1f32; g.len()];
            for &(c, p) in &g.edges {
                deg[c as usize] += 1.0;
                deg[p as usize] += 1.0;
            }
            for (i, d) in deg.iter().enumerate() {
                src.push(base + i as u32);
                dst.push(base + i as u32);
                norm.push(1.0 / d);
            }
            for &(c, p) in &g.edges {
                let w = 1.0 / (deg[c as usize] * deg[p as usize]).sqrt();
                src.extend([base + c, base + p]);
                dst.extend([base + p, base + c]);
                norm.extend([w, w]);
            }
            graph_of.extend(std::iter::repeat_n(gi as u32, g.len()));
            inv_len.push(1.0 / g.len() as f32);
            for i in 0..g.len() {
                padded[gi * max_len + i] = base + i as u32;
            }
            base += g.len() as u32;
        }
        let rows = rows.unwrap_or(all_rows);
        let e = norm.len();
        Ok(Batch {
            rows: Tensor::from_vec(rows, total, device)?,
            dense: Tensor::from_vec(dense, (total, DENSE), device)?,
            src: Tensor::from_vec(src, e, device)?,
            dst: Tensor::from_vec(dst, e, device)?,
            norm: Tensor::from_vec(norm, (e, 1), device)?,
            graph_of: Tensor::from_vec(graph_of, total, device)?,
            inv_len: Tensor::from_vec(inv_len, (graphs.len(), 1), device)?,
            padded: Tensor::from_vec(padded, graphs.len() * max_len, device)?,
            graphs: graphs.len(),
            max_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(f: &str, color: pb::Color, parent: i32, calls: u64) -> pb::TreeNode {
        pb::TreeNode { function: f.into(), module: "m".into(), color: color as i32, parent, children: vec![], calls }
    }

    #[test]
    fn trunk_is_trimmed_to_the_same_shape() {
        use pb::Color::{Blue, White};
        let vocab = Vocab::new([("m".to_string(), "a".to_string()), ("m".into(), "b".into())]);
        // libc -> main -> loop -> {a, b} (an AFCT) and loop -> {a, b} (a window of an FCT).
        let afct = pb::Tree {
            nodes: vec![
                node("libc", Blue, -1, 0),
                node("main", Blue, 0, 0),
                node("loop", Blue, 1, 0),
                node("a", White, 2, 3),
                node("b", White, 2, 1),
            ],
            truncated: false,
        };
        let fct = pb::Tree {
            nodes: vec![node("loop", Blue, -1, 0), node("a", White, 0, 3), node("b", White, 0, 1)],
            truncated: false,
        };
        let none = NormalProfile::default();
        let g1 = Graph::from_tree(&afct, &vocab, &none).unwrap();
        let g2 = Graph::from_tree(&fct, &vocab, &none).unwrap();
        assert_eq!(g1.rows, g2.rows);
        assert_eq!(g1.dense, g2.dense);
        assert_eq!(g1.edges, g2.edges);
        assert_eq!(g1.source, vec![2, 3, 4]);
        assert_eq!(g1.rows, vec![UNKNOWN, 1, 2]);
        assert_eq!(g1.dense[DENSE + 2], 0.75);
    }

    #[test]
    fn red_nodes_are_masked_and_bad_parents_refused() {
        use pb::Color::{Red, White};
        let vocab = Vocab::default();
        let none = NormalProfile::default();
        let t = pb::Tree {
            nodes: vec![node("a", White, -1, 1), node("r", Red, 0, 1), node("x", White, 1, 1)],
            truncated: false,
        };
        assert_eq!(Graph::from_tree(&t, &vocab, &none).unwrap().len(), 1);
        let bad = pb::Tree { nodes: vec![node("a", White, 0, 1)], truncated: false };
        let err = Graph::from_tree(&bad, &vocab, &none).unwrap_err().to_string();
        assert!(err.contains("parent 0"), "{err}");
        assert!(Graph::from_tree(&pb::Tree::default(), &vocab, &none).is_err());
    }
}
