//! AFCT construction: AFETM Algorithm 3 (sec. III.B.2), in time linear in the trace.
//!
//! The paper's algorithm scans the whole trace once per tree node (O(N^2)). What it computes is:
//! every observed (caller -> function) pair is an edge; every call stack adds the edges between
//! its consecutive frames (the paper's `merge`); roots are the functions nothing calls (Alg. 3
//! lines 3-8: callers that never appear as a traced function, and functions with no caller);
//! each node's children are the functions its function was seen calling, except those already
//! on the path from the root (`not_pred`, which stops recursion). We collect the edges once in a
//! graph ([`CallGraph`], O(events)) and unroll it from the roots (O(output nodes)).
//!
//! Because the tree unrolls function-level edges, a function gets the same children wherever it
//! appears; that is the "approximate" in AFCT and holds for the full FCT built the same way.
//!
//! Nodes are white when the function was traced in the window (it appears as a called function)
//! and blue when it is known only as a caller or a call-stack frame.

use std::collections::{HashMap, HashSet};

use crate::{
    graph::CallGraph,
    tree::{Forest, FuncId},
};

/// Default cap on AFCT nodes: unrolling a call graph can grow fast where many paths share
/// functions, so the tree stops there and says so (`Forest::truncated`).
pub const DEFAULT_NODE_CAP: usize = 200_000;

/// The trace data of one thread in one window, reduced to what Alg. 3 reads.
#[derive(Default, Debug, Clone)]
pub struct TraceData {
    /// (caller, function) -> calls. `calls == 0` marks an edge seen only inside call stacks.
    edges: HashMap<(Option<FuncId>, FuncId), u64>,
}

impl TraceData {
    pub fn new() -> Self {
        Self::default()
    }

    /// One element of the paper's trace data: `function` was called by `caller` (None when the
    /// caller could not be read), with `callstack` = [caller, caller's caller, ...] when the
    /// function records its call stack (F^callstack).
    pub fn add_call(&mut self, function: FuncId, caller: Option<FuncId>, callstack: &[FuncId]) {
        *self.edges.entry((caller, function)).or_insert(0) += 1;
        for pair in callstack.windows(2) {
            self.edges.entry((Some(pair[1]), pair[0])).or_insert(0);
        }
        if let (Some(first), Some(c)) = (callstack.first(), caller)
            && *first != c
        {
            // The unwinder disagreed with the caller attribute; keep both, the stack frame
            // hangs under its own caller.
            self.edges.entry((Some(*first), function)).or_insert(0);
        }
    }

    /// Adds an aggregated edge (as stored in the database).
    pub fn add_edge(&mut self, caller: Option<FuncId>, function: FuncId, calls: u64) {
        *self.edges.entry((caller, function)).or_insert(0) += calls;
    }

    pub fn edges(&self) -> impl Iterator<Item = (Option<FuncId>, FuncId, u64)> + '_ {
        self.edges.iter().map(|((c, f), n)| (*c, *f, *n))
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Functions traced in this data: those that appear as the called function of an event.
    pub fn traced(&self) -> HashSet<FuncId> {
        self.edges.iter().filter(|(_, n)| **n > 0).map(|((_, f), _)| *f).collect()
    }

    /// Builds the AFCT (Alg. 3): the window's [`CallGraph`] unrolled. `node_cap` bounds the
    /// output; see [`DEFAULT_NODE_CAP`].
    pub fn build(&self, node_cap: usize) -> Forest {
        self.graph().unroll(node_cap)
    }

    /// The window's call graph (one node per function), which [`TraceData::build`] unrolls.
    pub fn graph(&self) -> CallGraph {
        CallGraph::from_trace(self)
    }
}

/// The AFCT (Alg. 3) the analyzer builds from the events an agent running a plan sends while
/// the thread does what `fct` (its full trace) records: every call of a `traced` function is
/// an event (function, caller) with the caller as the full trace saw it, and a function of
/// `callstack` (F^callstack) also sends its call stack, the FCT's path above it.
///
/// This is Alg. 2's masked colored FCT when F^callstack is complete for `fct`; when it is not
/// (F^callstack was found on other normal FCTs), it is what the daemon really sees: a traced
/// function whose untraced ancestors are not known hangs under its immediate caller alone.
/// `calls` on a full-trace node is its (caller, callee) edge's count, so each edge is taken
/// once, not summed over the nodes that repeat it.
pub fn from_fct(fct: &Forest, traced: &HashSet<FuncId>, callstack: &HashSet<FuncId>, node_cap: usize) -> Forest {
    trace_of_fct(fct, traced, callstack).build(node_cap)
}

/// The trace data of [`from_fct`]: the events the plan's agent sends while the thread does what
/// `fct` records. Its [`TraceData::graph`] is the window's call graph as the analyzer gets it
/// from that agent, with no unrolling (what the diagnosis model reads).
pub fn trace_of_fct(fct: &Forest, traced: &HashSet<FuncId>, callstack: &HashSet<FuncId>) -> TraceData {
    let mut data = TraceData::new();
    for node in &fct.nodes {
        if !traced.contains(&node.func) {
            continue;
        }
        let caller = node.parent.map(|p| fct.nodes[p as usize].func);
        data.edges.insert((caller, node.func), node.calls.max(1));
        if callstack.contains(&node.func) {
            let mut up = node.parent;
            while let Some(p) = up {
                let parent = &fct.nodes[p as usize];
                let grand = parent.parent.map(|g| fct.nodes[g as usize].func);
                if let Some(g) = grand {
                    data.edges.entry((Some(g), parent.func)).or_insert(0);
                }
                up = parent.parent;
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::FuncTable;

    fn ids(t: &mut FuncTable, names: &[&str]) -> Vec<FuncId> {
        names.iter().map(|n| t.intern("m", n)).collect()
    }

    #[test]
    fn from_fct_is_the_masked_fct_with_a_complete_callstack_set_and_an_orphan_without() {
        // Full trace: main -> u1 -> u2 -> leaf (x3), main -> u1 -> other.
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["main", "u1", "u2", "leaf", "other"]);
        let (main, u1, u2, leaf, other) = (f[0], f[1], f[2], f[3], f[4]);
        let mut full = TraceData::new();
        full.add_call(u1, Some(main), &[]);
        full.add_call(u2, Some(u1), &[]);
        for _ in 0..3 {
            full.add_call(leaf, Some(u2), &[]);
        }
        full.add_call(other, Some(u1), &[]);
        let fct = full.build(DEFAULT_NODE_CAP);
        let traced: HashSet<FuncId> = [leaf, other].into();
        let with = from_fct(&fct, &traced, &[leaf].into(), DEFAULT_NODE_CAP);
        let colored = crate::coloring::color(std::slice::from_ref(&fct), &traced);
        assert_eq!(with.canonical(&t), crate::coloring::mask_red(&colored.fcts[0]).canonical(&t));
        assert_eq!(with.nodes.iter().find(|n| n.func == leaf).unwrap().calls, 3);
        // Without leaf's stack, the agent only knows leaf's caller u2: an orphan root.
        let without = from_fct(&fct, &traced, &HashSet::new(), DEFAULT_NODE_CAP);
        assert_eq!(without.canonical(&t), vec!["0 m!u1 Blue", "1 m!other White", "0 m!u2 Blue", "1 m!leaf White"]);
    }

    #[test]
    fn full_trace_gives_the_call_tree() {
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["libc", "main", "a", "b", "c"]);
        let (libc, main, a, b, c) = (f[0], f[1], f[2], f[3], f[4]);
        let mut d = TraceData::new();
        d.add_call(main, Some(libc), &[]);
        d.add_call(a, Some(main), &[]);
        d.add_call(b, Some(a), &[]);
        d.add_call(b, Some(a), &[]);
        d.add_call(c, Some(main), &[]);
        let tree = d.build(DEFAULT_NODE_CAP);
        assert_eq!(
            tree.canonical(&t),
            vec!["0 m!libc Blue", "1 m!main White", "2 m!a White", "3 m!b White", "2 m!c White"]
        );
        let b_node = tree.nodes.iter().find(|n| n.func == b).unwrap();
        assert_eq!(b_node.calls, 2);
    }

    #[test]
    fn recursion_and_cycles_are_cut_at_the_path() {
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["root", "fib", "even", "odd"]);
        let (root, fib, even, odd) = (f[0], f[1], f[2], f[3]);
        let mut d = TraceData::new();
        d.add_call(fib, Some(root), &[]);
        d.add_call(fib, Some(fib), &[]); // direct recursion
        d.add_call(even, Some(root), &[]);
        d.add_call(odd, Some(even), &[]); // mutual recursion even <-> odd
        d.add_call(even, Some(odd), &[]);
        let tree = d.build(DEFAULT_NODE_CAP);
        assert_eq!(tree.canonical(&t), vec!["0 m!root Blue", "1 m!even White", "2 m!odd White", "1 m!fib White"]);
    }

    #[test]
    fn a_cycle_with_no_entry_still_appears() {
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["x", "y"]);
        let mut d = TraceData::new();
        d.add_call(f[0], Some(f[1]), &[]);
        d.add_call(f[1], Some(f[0]), &[]);
        let tree = d.build(DEFAULT_NODE_CAP);
        assert_eq!(tree.canonical(&t), vec!["0 m!x White", "1 m!y White"]);
    }

    #[test]
    fn call_stacks_merge_orphan_subtrees() {
        // Traced: main, leaf, other. Untraced chain: main -> u1 -> u2 -> leaf, and u1 -> other.
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["libc", "main", "u1", "u2", "leaf", "other"]);
        let (libc, main, u1, u2, leaf, other) = (f[0], f[1], f[2], f[3], f[4], f[5]);
        let mut without = TraceData::new();
        without.add_call(main, Some(libc), &[]);
        without.add_call(leaf, Some(u2), &[]);
        without.add_call(other, Some(u1), &[]);
        // Without the call stack the forest falls apart into three trees.
        assert_eq!(without.build(DEFAULT_NODE_CAP).roots().count(), 3);

        let mut with = without.clone();
        with.add_call(leaf, Some(u2), &[u2, u1, main, libc]);
        let tree = with.build(DEFAULT_NODE_CAP);
        assert_eq!(
            tree.canonical(&t),
            vec!["0 m!libc Blue", "1 m!main White", "2 m!u1 Blue", "3 m!other White", "3 m!u2 Blue", "4 m!leaf White",]
        );
    }

    #[test]
    fn unknown_caller_makes_a_root_and_node_cap_truncates() {
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["a", "b", "c"]);
        let mut d = TraceData::new();
        d.add_call(f[0], None, &[]);
        d.add_call(f[1], Some(f[0]), &[]);
        d.add_call(f[2], Some(f[1]), &[]);
        let tree = d.build(DEFAULT_NODE_CAP);
        assert_eq!(tree.canonical(&t), vec!["0 m!a White", "1 m!b White", "2 m!c White"]);
        let capped = d.build(2);
        assert!(capped.truncated);
        assert_eq!(capped.len(), 2);
    }

    #[test]
    fn output_does_not_depend_on_event_order() {
        let mut t = FuncTable::default();
        let f = ids(&mut t, &["r", "a", "b", "c", "d"]);
        let calls = [(f[1], f[0]), (f[2], f[0]), (f[3], f[1]), (f[4], f[3]), (f[3], f[2])];
        let mut fwd = TraceData::new();
        let mut rev = TraceData::new();
        for (callee, caller) in calls {
            fwd.add_call(callee, Some(caller), &[]);
        }
        for (callee, caller) in calls.iter().rev() {
            rev.add_call(*callee, Some(*caller), &[]);
        }
        assert_eq!(fwd.build(100), rev.build(100));
    }
}

#[cfg(test)]
mod properties {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// On any trace: no function repeats on a root-to-node path, every observed edge u->v
        /// appears under every node of u unless v is already on that node's path, and the
        /// node cap holds.
        #[test]
        fn unrolling_is_complete_and_acyclic(edges in proptest::collection::vec((0u32..8, 0u32..8), 1..40), cap in 1usize..400) {
            let mut d = TraceData::new();
            for (c, f) in &edges {
                d.add_call(FuncId(*f), Some(FuncId(*c)), &[]);
            }
            let tree = d.build(cap);
            prop_assert!(tree.len() <= cap);
            let path = |mut i: usize| {
                let mut p = vec![tree.nodes[i].func];
                while let Some(up) = tree.nodes[i].parent { i = up as usize; p.push(tree.nodes[i].func); }
                p
            };
            for i in 0..tree.len() {
                let p = path(i);
                let unique: HashSet<_> = p.iter().collect();
                prop_assert_eq!(unique.len(), p.len(), "function repeated on a path");
            }
            if !tree.truncated {
                for (i, n) in tree.nodes.iter().enumerate() {
                    let on_path: HashSet<FuncId> = path(i).into_iter().collect();
                    let kids: HashSet<FuncId> = n.children.iter().map(|c| tree.nodes[*c as usize].func).collect();
                    for (c, f) in &edges {
                        if FuncId(*c) == n.func && !on_path.contains(&FuncId(*f)) {
                            prop_assert!(kids.contains(&FuncId(*f)), "edge {c}->{f} missing under a node");
                        }
                    }
                }
            }
        }
    }
}
