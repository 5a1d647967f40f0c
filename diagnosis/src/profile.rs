//! The normal profile: what fault-free windows look like under the model's plan, so that
//! every node of a tree can say how it deviates from normal (issue 23, "Deviation from
//! normal"). The methods that locate faults best compare against a fault-free baseline
//! (Nezha's fault-free event patterns, MicroRank's spectrum of normal traces); a GCN that sees
//! only the faulty tree has to learn the baseline from the class labels.
//!
//! Built from the normal-run graphs of the training-role runs (both sides of the training's
//! validation split; never a fault run, never an eval-role run) and stored in the model's
//! manifest.
//! Per (caller, callee) edge of the call graphs (recursion left out): in how many normal
//! windows it occurs and the range of its share of the window's traced calls; per function, in
//! how many windows it occurs. From these, four features per function ([`DEVIATION`] of them,
//! appended to the dense features by [`crate::graph::Graph`]):
//! 1. an edge into it never occurs in a normal window;
//! 2. the function never occurs in a normal window;
//! 3. the share of the children it has in every normal window where it occurs that it lacks
//!    here (a call that did not happen: a crash, a hang, a branch not taken);
//! 4. how far an edge into it has its share of the calls outside the normal range, as |log10|
//!    of the ratio to the nearest bound, capped at 1 (0 inside the range, or for a new edge;
//!    the largest over its incoming edges).
//!
//! Training and validation normal trees would see a profile made of themselves; so each normal
//! run's trees are compared with the profile of the other normal runs
//! ([`NormalProfile::without`]), as a new normal run is at serving, and fault runs' trees
//! against the whole profile, as serving sees them.

use std::collections::{BTreeMap, HashMap, HashSet};

use afetm_calltree::{
    graph::NamedGraph,
    tree::{Color, FuncId},
};
use serde::{Deserialize, Serialize};

/// Deviation features per node.
pub const DEVIATION: usize = 4;

/// One edge's record in one run's normal windows.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct EdgeRun {
    windows: u32,
    min_share: f32,
    max_share: f32,
}

/// What one normal run contributed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct RunPart {
    /// Function -> windows it occurs in (as a node).
    functions: HashMap<String, u32>,
    /// "caller\ncallee" -> record. (Functions keyed as `module:name`.)
    edges: HashMap<String, EdgeRun>,
}

/// See the module docs. Serialized as the merged counts (what serving reads); the per-run parts
/// that training's leave-one-run-out needs live only in memory.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NormalProfile {
    /// Per normal run (its FDDB id), what its windows hold (training only).
    #[serde(skip)]
    runs: BTreeMap<i64, RunPart>,
    /// Normal runs merged.
    normal_runs: usize,
    /// Function -> normal windows it occurs in.
    functions: BTreeMap<String, u32>,
    /// "caller\ncallee" -> its normal windows and share range.
    edges: BTreeMap<String, EdgeRun>,
    /// Function -> the children it calls in every normal window it occurs in (derived).
    #[serde(skip)]
    always: HashMap<String, Vec<String>>,
}

impl PartialEq for NormalProfile {
    fn eq(&self, o: &NormalProfile) -> bool {
        (self.normal_runs, &self.functions, &self.edges) == (o.normal_runs, &o.functions, &o.edges)
    }
}

fn edge_key(c: &str, f: &str) -> String {
    format!("{c}\n{f}")
}

/// The edges and functions of one window's graph (recursion left out), with each edge's share
/// of the graph's traced calls.
pub(crate) struct GraphView {
    /// The graph's functions in (module, name) order: the order of the model's nodes.
    pub(crate) order: Vec<FuncId>,
    /// Key (`module:name`) per function.
    pub(crate) key: BTreeMap<FuncId, String>,
    /// Keys of the edges into each function.
    pub(crate) incoming: BTreeMap<FuncId, Vec<String>>,
    /// Share of the graph's traced calls per edge key.
    pub(crate) share: HashMap<String, f32>,
    /// Children function keys per function key.
    pub(crate) children: HashMap<String, HashSet<String>>,
}

impl GraphView {
    pub(crate) fn of(input: &NamedGraph) -> GraphView {
        let g = &input.graph;
        let key: BTreeMap<FuncId, String> =
            g.nodes.keys().map(|f| (*f, format!("{}:{}", input.func(*f).module, input.func(*f).name))).collect();
        let mut order: Vec<FuncId> = g.nodes.keys().copied().collect();
        order.sort_by(|a, b| input.func(*a).cmp(input.func(*b)));
        let mut incoming: BTreeMap<FuncId, Vec<String>> = BTreeMap::new();
        let mut calls: HashMap<String, u64> = HashMap::new();
        let mut children: HashMap<String, HashSet<String>> = HashMap::new();
        for (&(c, f), &n) in g.edges.iter().filter(|((c, f), _)| c != f) {
            let (Some(ck), Some(fk)) = (key.get(&c), key.get(&f)) else { continue };
            let e = edge_key(ck, fk);
            let traced = g.nodes.get(&f) == Some(&Color::White);
            *calls.entry(e.clone()).or_insert(0) += if traced { n } else { 0 };
            children.entry(ck.clone()).or_default().insert(fk.clone());
            incoming.entry(f).or_default().push(e);
        }
        let total: u64 = calls.values().sum();
        let share =
            calls.into_iter().map(|(e, c)| (e, if total == 0 { 0.0 } else { c as f32 / total as f32 })).collect();
        GraphView { order, key, incoming, share, children }
    }
}

impl NormalProfile {
    /// The profile of normal windows given as (run, graph).
    pub fn build<'a>(graphs: impl IntoIterator<Item = (i64, &'a NamedGraph)>) -> NormalProfile {
        let mut p = NormalProfile::default();
        for (run, graph) in graphs {
            let v = GraphView::of(graph);
            let part = p.runs.entry(run).or_default();
            for f in v.key.values() {
                *part.functions.entry(f.clone()).or_insert(0) += 1;
            }
            for (e, s) in &v.share {
                let r = part.edges.entry(e.clone()).or_insert(EdgeRun { windows: 0, min_share: *s, max_share: *s });
                r.windows += 1;
                r.min_share = r.min_share.min(*s);
                r.max_share = r.max_share.max(*s);
            }
        }
        p.merge();
        p
    }

    /// The profile without one run's windows (for that run's own trees in training).
    pub fn without(&self, run: i64) -> NormalProfile {
        let mut p = NormalProfile { runs: self.runs.clone(), ..NormalProfile::default() };
        p.runs.remove(&run);
        p.merge();
        p
    }

    /// Normal runs it was built from.
    pub fn runs(&self) -> usize {
        self.normal_runs
    }

    /// Whether it holds no window (then every deviation feature is 0: the ablation).
    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }

    /// Merges the runs' parts into the counts, then derives the always-called children.
    fn merge(&mut self) {
        self.normal_runs = self.runs.len();
        self.functions.clear();
        self.edges.clear();
        for part in self.runs.values() {
            for (f, w) in &part.functions {
                *self.functions.entry(f.clone()).or_insert(0) += w;
            }
            for (e, r) in &part.edges {
                self.edges
                    .entry(e.clone())
                    .and_modify(|x| {
                        x.windows += r.windows;
                        x.min_share = x.min_share.min(r.min_share);
                        x.max_share = x.max_share.max(r.max_share);
                    })
                    .or_insert(*r);
            }
        }
        self.index();
    }

    /// Derives the always-called children from the counts (after deserialization too): a child
    /// is always called by f when its edge occurs in every window f occurs in.
    pub(crate) fn index(&mut self) {
        self.always.clear();
        for (e, r) in &self.edges {
            if let Some((c, f)) = e.split_once('\n')
                && self.functions.get(c).is_some_and(|w| *w == r.windows)
            {
                self.always.entry(c.to_string()).or_default().push(f.to_string());
            }
        }
    }

    /// The [`DEVIATION`] features of every function of the view; all zeros for an empty
    /// profile.
    pub(crate) fn features(&self, view: &GraphView) -> BTreeMap<FuncId, [f32; DEVIATION]> {
        let m = self;
        if m.is_empty() {
            return view.key.keys().map(|id| (*id, [0.0; DEVIATION])).collect();
        }
        view.key
            .iter()
            .map(|(id, f)| {
                let new_function = !m.functions.contains_key(f);
                let (mut new_edge, mut out_of_range) = (false, 0.0f32);
                for e in view.incoming.get(id).into_iter().flatten() {
                    match m.edges.get(e) {
                        None => new_edge = true,
                        Some(r) => {
                            out_of_range = out_of_range.max(outside(view.share.get(e).copied().unwrap_or(0.0), r))
                        }
                    }
                }
                let missing = m.always.get(f).map_or(0.0, |always| {
                    let have = view.children.get(f);
                    let lacking = always.iter().filter(|c| have.is_none_or(|h| !h.contains(*c))).count();
                    lacking as f32 / always.len() as f32
                });
                (*id, [new_edge as u8 as f32, new_function as u8 as f32, missing, out_of_range])
            })
            .collect()
    }
}

/// |log10(share / nearest bound)| outside [min, max], capped at 1; 0 inside.
fn outside(share: f32, r: &EdgeRun) -> f32 {
    const EPS: f32 = 1e-4;
    let ratio = if share > r.max_share {
        (share + EPS) / (r.max_share + EPS)
    } else if share < r.min_share {
        (r.min_share + EPS) / (share + EPS)
    } else {
        return 0.0;
    };
    ratio.log10().min(1.0)
}

#[cfg(test)]
mod tests {
    use afetm_proto::v1 as pb;

    use super::*;

    fn node(f: &str, parent: i32, calls: u64) -> pb::TreeNode {
        pb::TreeNode {
            function: f.into(),
            module: "m".into(),
            color: pb::Color::White as i32,
            parent,
            children: vec![],
            calls,
        }
    }

    fn graph(nodes: Vec<pb::TreeNode>) -> NamedGraph {
        NamedGraph::from_tree(&pb::Tree { nodes, truncated: false }).unwrap()
    }

    /// The features by function name.
    fn by_name(p: &NormalProfile, g: &NamedGraph) -> BTreeMap<String, [f32; DEVIATION]> {
        p.features(&GraphView::of(g)).into_iter().map(|(f, x)| (g.func(f).name.to_string(), x)).collect()
    }

    #[test]
    fn new_edges_missing_children_and_shares_out_of_range() {
        // Normal: loop -> {read, reply}, read 9 calls and reply 1 (or 8 and 2).
        let n1 = graph(vec![node("loop", -1, 1), node("read", 0, 9), node("reply", 0, 1)]);
        let n2 = graph(vec![node("loop", -1, 1), node("read", 0, 8), node("reply", 0, 2)]);
        let p = NormalProfile::build([(1, &n1), (2, &n2)]);
        assert_eq!(p.runs(), 2);
        let f = |g: &NamedGraph| by_name(&p, g);
        assert!(f(&n1).values().all(|x| *x == [0.0; DEVIATION]), "a normal graph deviates nowhere: {:?}", f(&n1));
        // A crash after read: reply is missing under loop; a new function `panic` under read.
        let crash = graph(vec![node("loop", -1, 1), node("read", 0, 9), node("panic", 1, 1)]);
        let x = f(&crash);
        assert_eq!(x["loop"][2], 0.5, "loop lacks one of its two always-children");
        assert_eq!((x["panic"][0], x["panic"][1]), (1.0, 1.0), "panic: a new edge and a new function");
        // Shares out of range: reply at 10 of 11 calls, against 10-20%.
        let slow = graph(vec![node("loop", -1, 0), node("read", 0, 1), node("reply", 0, 10)]);
        let y = f(&slow);
        assert!(y["reply"][3] > 0.5 && y["read"][3] > 0.5, "{y:?}");
        // A function called from two places is one node: a known and a new edge into it make
        // it "new edge".
        let shared = graph(vec![node("loop", -1, 1), node("read", 0, 9), node("reply", 0, 1), node("reply", 1, 1)]);
        assert_eq!(f(&shared)["reply"][0], 1.0);
        // Leave-one-run-out: n1's own edges stay known through run 2, and a profile of nothing
        // gives zeros.
        assert!(by_name(&p.without(1), &n1).values().all(|x| x[0] == 0.0 && x[1] == 0.0));
        assert!(by_name(&NormalProfile::default(), &crash).values().all(|x| *x == [0.0; DEVIATION]));
        let mut back: NormalProfile = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        back.index();
        assert_eq!(back, p);
        assert_eq!(by_name(&back, &crash), x, "stored with the model, it reads the same");
    }
}
