//! The call graph holds what the AFCT holds: over random event streams (calls with and without
//! a known caller, call stacks, recursion, cycles), the graph of the events unrolled is the AFCT
//! Alg. 3 builds from them, and the graph read back from that AFCT is the graph of the events
//! minus only the edges the tree never shows (into a function already on the path). Without a
//! cycle (recursion aside) unrolling it again gives the same AFCT, node for node; with one, the
//! tree has lost the cycle's back edges, so only the graph of the events is complete.
use afetm_calltree::{afct::TraceData, graph::CallGraph, tree::FuncId};
use proptest::prelude::*;

/// Node cap for the random graphs: ten densely connected functions can unroll to millions of
/// nodes; the cut itself is tested apart.
const CAP: usize = 5_000;
const DEFAULT_NODE_CAP: usize = CAP;

/// One event: function, caller (None: unknown), call stack above the caller.
type Event = (u32, Option<u32>, Vec<u32>);

fn events() -> impl Strategy<Value = Vec<Event>> {
    let one = (0u32..10, proptest::option::weighted(0.9, 0u32..10), proptest::collection::vec(0u32..10, 0..4));
    proptest::collection::vec(one, 1..60)
}

fn trace(events: &[Event]) -> TraceData {
    let mut d = TraceData::new();
    for (f, caller, above) in events {
        let caller = caller.map(FuncId);
        // A call stack starts at the caller, as the agent sends it.
        let stack: Vec<FuncId> = caller.into_iter().chain(above.iter().map(|x| FuncId(*x))).collect();
        d.add_call(FuncId(*f), caller, if above.is_empty() { &[] } else { &stack });
    }
    d
}

proptest! {
    #[test]
    fn the_graph_unrolled_is_the_afct_and_the_afct_gives_the_graph_back(events in events()) {
        let data = trace(&events);
        let afct = data.build(DEFAULT_NODE_CAP);
        let graph = data.graph();
        prop_assert_eq!(&graph.unroll(DEFAULT_NODE_CAP), &afct);
        prop_assert!(graph.len() <= 10, "one node per function");
        if afct.truncated {
            return Ok(());
        }
        let back = CallGraph::from_forest(&afct);
        prop_assert_eq!(&back.nodes, &graph.nodes, "every function, with its color");
        for (edge, calls) in &back.edges {
            prop_assert_eq!(graph.edges.get(edge), Some(calls), "edge {:?} as the events have it", edge);
        }
        let mut plain = petgraph::graphmap::DiGraphMap::<u32, ()>::new();
        for (c, f) in graph.edges.keys().filter(|(c, f)| c != f) {
            plain.add_edge(c.0, f.0, ());
        }
        if !petgraph::algo::is_cyclic_directed(&plain) {
            let mut folded = graph.clone();
            folded.edges.retain(|(c, f), _| c != f);
            prop_assert_eq!(&back, &folded, "no cycle: the tree shows every edge but recursion's");
            prop_assert_eq!(&back.unroll(DEFAULT_NODE_CAP), &afct, "the tree's graph unrolls to the same tree");
        }
    }

    #[test]
    fn a_cut_tree_says_so(events in events(), cap in 1usize..20) {
        let data = trace(&events);
        let full = data.build(DEFAULT_NODE_CAP);
        let cut = data.graph().unroll(cap);
        prop_assert_eq!(cut.truncated, full.len() > cap);
        prop_assert!(CallGraph::from_forest(&cut).truncated == cut.truncated);
    }
}

#[test]
fn recursion_and_shared_helpers_are_one_node_each() {
    // main -> a -> helper, main -> b -> helper, helper -> helper (recursion).
    let mut d = TraceData::new();
    let (main, a, b, helper) = (FuncId(0), FuncId(1), FuncId(2), FuncId(3));
    for _ in 0..3 {
        d.add_call(a, Some(main), &[]);
        d.add_call(helper, Some(a), &[]);
    }
    d.add_call(b, Some(main), &[]);
    d.add_call(helper, Some(b), &[]);
    d.add_call(helper, Some(helper), &[]);
    let g = d.graph();
    assert_eq!(g.len(), 4);
    assert_eq!(g.edges.get(&(a, helper)), Some(&3));
    assert_eq!(g.edges.get(&(helper, helper)), Some(&1), "the graph keeps the recursion the tree folds");
    let t = g.unroll(DEFAULT_NODE_CAP);
    assert_eq!(t.len(), 5, "main, a, helper, b, helper");
}
