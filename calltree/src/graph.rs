//! A window's call graph: the caller -> callee graph that Alg. 3 (sec. III.B.2) unrolls into
//! the AFCT, kept as a type of its own with one node per function.
//!
//! The AFCT repeats a function under every path that reaches it (with the same children each
//! time: that is the "approximate" of AFCT), so a library with many shared helpers unrolls to
//! trees of 50,000-200,000 nodes per window (libsqlite3) while its graph has at most one node
//! per traced function. [`CallGraph::unroll`] gives the AFCT back, node for node
//! ([`crate::afct::TraceData::build`] is this unrolling), and [`CallGraph::from_forest`] reads
//! the graph out of an AFCT or FCT (the property tests in `tests/graph.rs`). The graph holds
//! more than the tree: a tree leaves out every edge into a function already on its path
//! (recursion, and a cycle's back edge), so only without cycles does the graph read from a
//! tree unroll to the same tree again. What a tree repeats, the graph says once: the calls of
//! an edge (the count of its (caller, callee) pair in the thread, as on every tree node that
//! shows it) and a function's color.
//!
//! Written by hand over `petgraph`'s `DiGraphMap` because the order of the unrolling (roots
//! and children by function id, Alg. 3's `not_pred` along the path) is the AFCT's definition.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
};

use petgraph::{Direction, graphmap::DiGraphMap};

use crate::{
    afct::TraceData,
    tree::{Color, Forest, Func, FuncId, FuncTable},
};

/// One thread's call graph in one window (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallGraph {
    /// Every function seen, white when it was traced (called in an event), blue when known only
    /// as a caller or a call-stack frame.
    pub nodes: BTreeMap<FuncId, Color>,
    /// (caller, callee) -> calls; 0 for an edge seen only inside call stacks. A self-edge is
    /// recursion, which the unrolled tree folds.
    pub edges: BTreeMap<(FuncId, FuncId), u64>,
    /// Read from a tree that was cut at its node cap: edges past the cut are missing.
    pub truncated: bool,
}

impl CallGraph {
    /// The graph of a window's trace data: what Alg. 3 reads.
    pub fn from_trace(data: &TraceData) -> CallGraph {
        let traced = data.traced();
        let mut g = CallGraph::default();
        for (caller, function, calls) in data.edges() {
            g.nodes.insert(function, Color::White);
            if let Some(c) = caller {
                g.nodes.entry(c).or_insert(Color::Blue);
                *g.edges.entry((c, function)).or_insert(0) += calls;
            }
        }
        for (f, color) in g.nodes.iter_mut() {
            *color = if traced.contains(f) { Color::White } else { Color::Blue };
        }
        g
    }

    /// The graph a tree unrolls: every (parent, child) pair of its nodes as an edge with the
    /// child's calls, every function with its color.
    pub fn from_forest(forest: &Forest) -> CallGraph {
        let mut g = CallGraph { truncated: forest.truncated, ..CallGraph::default() };
        for n in &forest.nodes {
            g.nodes.insert(n.func, n.color);
            if let Some(p) = n.parent {
                let caller = forest.nodes[p as usize].func;
                let e = g.edges.entry((caller, n.func)).or_insert(0);
                *e = (*e).max(n.calls);
            }
        }
        g
    }

    /// Functions in the graph.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The AFCT: the graph unrolled from its roots (functions nothing else calls), children in
    /// function order, never repeating a function already on the path (Alg. 3's `not_pred`);
    /// cycles nothing outside calls into start from their smallest function. Stops at
    /// `node_cap` nodes and says so (`Forest::truncated`).
    pub fn unroll(&self, node_cap: usize) -> Forest {
        let mut graph: DiGraphMap<FuncId, u64> = DiGraphMap::new();
        for f in self.nodes.keys() {
            graph.add_node(*f);
        }
        for (&(c, f), &calls) in &self.edges {
            graph.add_edge(c, f, calls);
        }
        let nodes: Vec<FuncId> = self.nodes.keys().copied().collect();
        let has_caller = |f: FuncId| graph.neighbors_directed(f, Direction::Incoming).any(|c| c != f);
        let mut roots: BTreeSet<FuncId> = nodes.iter().copied().filter(|f| !has_caller(*f)).collect();
        let color = |f: FuncId| self.nodes.get(&f).copied().unwrap_or(Color::Blue);
        let mut forest = Forest::default();
        let mut reached: HashSet<FuncId> = HashSet::new();
        let mut next_unreached = 0usize;
        loop {
            for &root in &roots {
                if !unroll_from(&graph, root, &mut forest, &mut reached, node_cap, &color) {
                    forest.truncated = true;
                    return forest;
                }
            }
            roots.clear();
            while next_unreached < nodes.len() && reached.contains(&nodes[next_unreached]) {
                next_unreached += 1;
            }
            match nodes.get(next_unreached) {
                Some(f) => {
                    roots.insert(*f);
                }
                None => break,
            }
        }
        forest.truncated |= self.truncated;
        forest
    }
}

/// Depth-first unrolling of `graph` from `root`, never repeating a function already on the path
/// (Alg. 3's `not_pred`). Returns false when the node cap stopped it.
fn unroll_from(
    graph: &DiGraphMap<FuncId, u64>,
    root: FuncId,
    forest: &mut Forest,
    reached: &mut HashSet<FuncId>,
    node_cap: usize,
    color: &impl Fn(FuncId) -> Color,
) -> bool {
    enum Step {
        Enter { func: FuncId, parent: Option<u32>, calls: u64 },
        Exit(FuncId),
    }
    let mut on_path: HashSet<FuncId> = HashSet::new();
    let mut stack = vec![Step::Enter { func: root, parent: None, calls: 0 }];
    while let Some(step) = stack.pop() {
        match step {
            Step::Exit(f) => {
                on_path.remove(&f);
            }
            Step::Enter { func, parent, calls } => {
                if forest.len() >= node_cap {
                    return false;
                }
                reached.insert(func);
                let id = forest.push(func, color(func), parent, calls);
                on_path.insert(func);
                stack.push(Step::Exit(func));
                let mut kids: Vec<(FuncId, u64)> = graph
                    .edges_directed(func, Direction::Outgoing)
                    .map(|(_, to, calls)| (to, *calls))
                    .filter(|(to, _)| !on_path.contains(to))
                    .collect();
                // Reverse order on the stack gives ascending order in the preorder output.
                kids.sort_by_key(|k| std::cmp::Reverse(k.0));
                for (to, calls) in kids {
                    stack.push(Step::Enter { func: to, parent: Some(id), calls });
                }
            }
        }
    }
    true
}

/// A call graph with the names of its functions: the form in which a graph leaves the code that
/// built it (the FDDB's dataset, the store, a tree from the wire) and reaches the diagnosis
/// model, which reads functions by (module, name). `funcs` holds at least the graph's
/// functions; several graphs may share one table.
#[derive(Clone, Debug, Default)]
pub struct NamedGraph {
    /// The graph.
    pub graph: CallGraph,
    /// Names of its [`FuncId`]s.
    pub funcs: Arc<FuncTable>,
}

impl NamedGraph {
    /// The graph of `graph`'s functions re-interned into a table of their own (so that a graph
    /// taken out of a large table does not keep the whole table alive).
    pub fn compact(graph: &CallGraph, table: &FuncTable) -> NamedGraph {
        let mut funcs = FuncTable::default();
        let mut map = |id: FuncId| {
            let f = table.get(id);
            funcs.intern(&f.module, &f.name)
        };
        let nodes: BTreeMap<FuncId, Color> = graph.nodes.iter().map(|(f, c)| (map(*f), *c)).collect();
        let edges = graph.edges.iter().map(|(&(c, f), n)| ((map(c), map(f)), *n)).collect();
        NamedGraph { graph: CallGraph { nodes, edges, truncated: graph.truncated }, funcs: Arc::new(funcs) }
    }

    /// The graph of a tree in its wire form with red nodes and what hangs under them masked
    /// (Alg. 2), as [`CallGraph::from_forest`] reads it: what the model sees of a tree sent to
    /// `Query.Diagnose` or of a colored FCT. Errors name the malformed node.
    pub fn from_tree(tree: &afetm_proto::Tree) -> Result<NamedGraph, String> {
        let mut funcs = FuncTable::default();
        let forest = Forest::from_proto(tree, &mut funcs)?.filtered(|n| n.color != Color::Red);
        Ok(NamedGraph { graph: CallGraph::from_forest(&forest), funcs: Arc::new(funcs) })
    }

    /// The function of an id of the graph.
    pub fn func(&self, id: FuncId) -> &Func {
        self.funcs.get(id)
    }
}
