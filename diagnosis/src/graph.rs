//! From a window's call graph to the GCN's input: normalization, node features, and batches of
//! many graphs as one disjoint union.
//!
//! The input is a [`NamedGraph`]: one node per function, the (caller, callee) edges with their
//! calls (issue 23, "the window's call graph as the model's input, not its unrolling"). In
//! training it is the graph of the events the plan's agent would send for a campaign FCT
//! (`afct::trace_of_fct`), at run time the graph of the events the agent sent (the store's
//! edges of the window): the same type and the same construction on both sides, and a window
//! whose AFCT unrolls to 50,000-200,000 nodes (libsqlite3) is a graph of at most one node per
//! traced function. A tree (a `Query.Diagnose` request, a colored FCT) is read as the graph it
//! unrolls ([`Graph::from_tree`]).
//!
//! **Trunk trimming.** An AFCT's blue ancestors come from call stacks and reach the outermost
//! frame (`__libc_start_call_main -> main -> aeMain -> ...`); a window of a full-trace FCT
//! starts inside the event loop (`aeMain` is its root). Both shapes carry the same information
//! below the first node that branches or is traced, so every chain of blue nodes that nothing
//! calls and that call one function each is dropped from the top before features are taken:
//! without it the same thread would sit two levels deeper at run time than in training.
//!
//! **Node features** (nothing scales with the request rate: the campaign drives a low fixed
//! rate, production runs at full load): the function's vocabulary index (an embedding row in
//! the model; [`UNKNOWN`] for functions the model never saw), white / blue one-hot, the
//! function's share of the graph's calls (the calls of its incoming edges, recursion left out;
//! traced functions only: blue ones come from call stacks and carry none) and its square root,
//! its shortest distance from the trimmed roots (divided by [`DEPTH_SCALE`], capped at 1), and
//! how many functions it calls and is called by (divided by [`DEGREE_SCALE`], capped at 1: a
//! tree shows a node's children as nodes, a graph shares them between callers, so a call that
//! a fault adds or removes must show in the caller's own features); then its [`DEVIATION`]
//! features against the model's normal profile (a new incoming edge, a new function,
//! always-called children missing, an incoming edge's call share out of the normal range:
//! [`crate::profile`]). The GCN's edges are the graph's caller -> callee edges
//! (recursion is a self loop, which eq. 10's A + I has anyway).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use afetm_calltree::{
    graph::NamedGraph,
    tree::{Color, FuncId},
};
use afetm_proto::v1 as pb;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    DiagnosisError,
    profile::{DEVIATION, GraphView, NormalProfile},
};

/// Vocabulary row of every function the model does not know.
pub const UNKNOWN: u32 = 0;
/// Dense features per node from the graph alone (white, blue, share, sqrt(share), depth,
/// callees, callers).
pub const GRAPH_DENSE: usize = 7;
/// Number of dense features per node: the graph's, then the deviation from the normal profile
/// ([`crate::profile`]).
pub const DENSE: usize = GRAPH_DENSE + DEVIATION;
/// Depth at which the depth feature saturates.
pub const DEPTH_SCALE: f32 = 32.0;
/// Distinct callees (or callers) at which the degree features saturate.
pub const DEGREE_SCALE: f32 = 16.0;

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

/// One window's graph as the model's input: nodes with their vocabulary row and dense
/// features, and the graph's edges (callee, caller) as indexes into the nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    /// Vocabulary row per node.
    pub rows: Vec<u32>,
    /// [`DENSE`] features per node, row-major.
    pub dense: Vec<f32>,
    /// (callee, caller) per edge between two kept functions, recursion left out.
    pub edges: Vec<(u32, u32)>,
}

impl Graph {
    /// Normalizes `input` (trunk trimming, see the module docs) and takes its features, the
    /// deviation from `normal` among them. Errors on a graph with no function.
    pub fn from_graph(input: &NamedGraph, vocab: &Vocab, normal: &NormalProfile) -> Result<Graph, DiagnosisError> {
        let g = &input.graph;
        let view = GraphView::of(input);
        let deviation = normal.features(&view);
        let keep = kept(input);
        let order: Vec<FuncId> = view.order.iter().copied().filter(|f| keep.contains(f)).collect();
        if order.is_empty() {
            return Err(DiagnosisError::BadTree("the graph has no traced or recovered function".into()));
        }
        let index: BTreeMap<FuncId, u32> = order.iter().enumerate().map(|(i, f)| (*f, i as u32)).collect();
        let white = |f: FuncId| g.nodes.get(&f) == Some(&Color::White);
        // Only traced functions' calls count: blue ones come from call stacks.
        let mut calls: BTreeMap<FuncId, u64> = BTreeMap::new();
        let mut edges = Vec::new();
        for (&(c, f), &n) in g.edges.iter().filter(|((c, f), _)| c != f) {
            if index.contains_key(&f) && white(f) {
                *calls.entry(f).or_insert(0) += n;
            }
            if let (Some(ci), Some(fi)) = (index.get(&c), index.get(&f)) {
                edges.push((*fi, *ci));
            }
        }
        let total: u64 = calls.values().sum();
        let depth = depths(order.len(), &edges);
        let (mut callees, mut callers) = (vec![0u32; order.len()], vec![0u32; order.len()]);
        for &(f, c) in &edges {
            callees[c as usize] += 1;
            callers[f as usize] += 1;
        }
        let degree = |n: u32| (n as f32 / DEGREE_SCALE).min(1.0);
        let mut out = Graph { rows: Vec::with_capacity(order.len()), dense: Vec::new(), edges };
        for (i, f) in order.iter().enumerate() {
            let func = input.func(*f);
            out.rows.push(vocab.row(&func.module, &func.name));
            let c = calls.get(f).copied().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { c as f32 / total as f32 };
            out.dense.extend([
                white(*f) as u8 as f32,
                !white(*f) as u8 as f32,
                share,
                share.sqrt(),
                (depth[i] as f32 / DEPTH_SCALE).min(1.0),
                degree(callees[i]),
                degree(callers[i]),
            ]);
            out.dense.extend(deviation.get(f).copied().unwrap_or([0.0; DEVIATION]));
        }
        Ok(out)
    }

    /// The graph a tree in its wire form unrolls (red nodes masked, so a colored FCT can be
    /// passed as it is), as [`Graph::from_graph`] reads it. Errors on a malformed tree (a
    /// parent that is not an earlier node) and on an empty one.
    pub fn from_tree(tree: &pb::Tree, vocab: &Vocab, normal: &NormalProfile) -> Result<Graph, DiagnosisError> {
        let input = NamedGraph::from_tree(tree).map_err(DiagnosisError::BadTree)?;
        Graph::from_graph(&input, vocab, normal)
    }

    /// Nodes.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Never true for a graph made by [`Graph::from_graph`].
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// The functions that survive trunk trimming: blue functions that nothing calls and that call
/// exactly one function are dropped, then their callee if it is now such a function, and so on.
fn kept(input: &NamedGraph) -> BTreeSet<FuncId> {
    let g = &input.graph;
    let mut callers: BTreeMap<FuncId, usize> = g.nodes.keys().map(|f| (*f, 0)).collect();
    let mut callees: BTreeMap<FuncId, Vec<FuncId>> = BTreeMap::new();
    for &(c, f) in g.edges.keys().filter(|(c, f)| c != f) {
        *callers.entry(f).or_insert(0) += 1;
        callees.entry(c).or_default().push(f);
    }
    let droppable = |f: FuncId, callers: &BTreeMap<FuncId, usize>| {
        g.nodes.get(&f) != Some(&Color::White)
            && callers.get(&f) == Some(&0)
            && callees.get(&f).is_some_and(|k| k.len() == 1)
    };
    let mut keep: BTreeSet<FuncId> = g.nodes.keys().copied().collect();
    let mut queue: VecDeque<FuncId> = keep.iter().copied().filter(|f| droppable(*f, &callers)).collect();
    while let Some(f) = queue.pop_front() {
        if !keep.remove(&f) {
            continue;
        }
        let child = callees[&f][0];
        if let Some(n) = callers.get_mut(&child) {
            *n -= 1;
        }
        if keep.contains(&child) && droppable(child, &callers) {
            queue.push_back(child);
        }
    }
    keep
}

/// Shortest distance of every node from a node nothing calls (breadth first over the
/// (callee, caller) edges); a cycle nothing outside calls into starts at its first node.
fn depths(n: usize, edges: &[(u32, u32)]) -> Vec<u32> {
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut has_caller = vec![false; n];
    for &(f, c) in edges {
        out[c as usize].push(f);
        has_caller[f as usize] = true;
    }
    let mut depth = vec![u32::MAX; n];
    // All roots at once (multi-source), then each node still unreached (a cycle's) on its own.
    breadth_first(&out, &mut depth, (0..n).filter(|i| !has_caller[*i]));
    for i in 0..n {
        breadth_first(&out, &mut depth, [i]);
    }
    depth
}

/// Sets `depth` of every node reachable from `seeds` (depth 0) that has none yet.
fn breadth_first(out: &[Vec<u32>], depth: &mut [u32], seeds: impl IntoIterator<Item = usize>) {
    let mut queue: VecDeque<usize> = seeds.into_iter().filter(|s| depth[*s] == u32::MAX).collect();
    for s in &queue {
        depth[*s] = 0;
    }
    while let Some(i) = queue.pop_front() {
        for &k in &out[i] {
            if depth[k as usize] == u32::MAX {
                depth[k as usize] = depth[i] + 1;
                queue.push_back(k as usize);
            }
        }
    }
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
        assert_eq!(g1, g2);
        // Nodes in name order: a, b, loop.
        assert_eq!(g1.rows, vec![1, 2, UNKNOWN]);
        assert_eq!(g1.edges, vec![(0, 2), (1, 2)]);
        assert_eq!(g1.dense[2], 0.75, "a's share of the calls");
        assert_eq!(g1.dense[DENSE + 4], 1.0 / DEPTH_SCALE, "b one below loop");
    }

    #[test]
    fn a_function_called_from_many_places_is_one_node() {
        use pb::Color::{Blue, White};
        let vocab = Vocab::default();
        let none = NormalProfile::default();
        // loop -> {a -> h, b -> h -> a}: the tree repeats h (and a); the graph has each once,
        // with the cycle a -> h -> a as two edges.
        let t = pb::Tree {
            nodes: vec![
                node("loop", Blue, -1, 0),
                node("a", White, 0, 2),
                node("h", White, 1, 4),
                node("b", White, 0, 1),
                node("h", White, 3, 4),
                node("a", White, 4, 1),
            ],
            truncated: false,
        };
        let g = Graph::from_tree(&t, &vocab, &none).unwrap();
        assert_eq!(g.len(), 4);
        assert_eq!(g.edges.len(), 5, "loop-a, a-h, loop-b, b-h, h-a");
        // a's calls: 2 from loop + 1 from h, of the graph's 2 + 4 + 1 + 4 + 1 (one count per
        // (caller, callee) edge, however often the tree repeats it).
        let share_a = g.dense[2];
        assert!((share_a - 3.0 / 12.0).abs() < 1e-6, "{share_a}");
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
