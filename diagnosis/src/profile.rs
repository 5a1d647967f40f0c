//! The normal profile: what fault-free windows look like under the model's plan, so that
//! every node of a tree can say how it deviates from normal (issue 23, "Deviation from
//! normal"). The methods that locate faults best compare against a fault-free baseline
//! (Nezha's fault-free event patterns, MicroRank's spectrum of normal traces); a GCN that sees
//! only the faulty tree has to learn the baseline from the class labels.
//!
//! Built from the training split's normal-run trees only and stored in the model's manifest.
//! Per (caller, callee) edge of the trees (after red masking, both as functions): in how many
//! normal windows it occurs and the range of its share of the window's traced calls; per
//! function, in how many windows it occurs. From these, four features per node
//! ([`DEVIATION`] of them, appended to the dense features by [`crate::graph::Graph`]):
//! 1. the edge from its parent never occurs in a normal window;
//! 2. its function never occurs in a normal window;
//! 3. the share of the children its function has in every normal window where it occurs that
//!    it lacks here (a call that did not happen: a crash, a hang, a branch not taken);
//! 4. how far its edge's share of the calls is outside the normal range, as |log10| of the
//!    ratio to the nearest bound, capped at 1 (0 inside the range, or for a new edge).
//!
//! Training normal trees would see a profile made of themselves; so each normal run's trees
//! are featurized against the profile of the other normal runs ([`NormalProfile::without`]),
//! and fault runs' trees against the whole profile, as serving sees it.

use std::collections::{BTreeMap, HashMap, HashSet};

use afetm_proto::v1 as pb;
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

/// The edges and functions of one tree (red nodes and what hangs under them left out), with
/// each edge's share of the tree's traced calls.
pub(crate) struct TreeView {
    /// Function key per node (None: masked).
    pub(crate) func: Vec<Option<String>>,
    /// Edge key (parent, node) per node with a kept parent.
    pub(crate) edge: Vec<Option<String>>,
    /// Share of the tree's traced calls per edge key (summed over the nodes that show it
    /// divided by the nodes: a tree repeats an edge with its one count).
    pub(crate) share: HashMap<String, f32>,
    /// Children function keys per function key.
    pub(crate) children: HashMap<String, HashSet<String>>,
}

impl TreeView {
    pub(crate) fn of(tree: &pb::Tree) -> TreeView {
        let n = tree.nodes.len();
        let mut func: Vec<Option<String>> = Vec::with_capacity(n);
        let mut edge = vec![None; n];
        let mut calls: HashMap<String, u64> = HashMap::new();
        let mut children: HashMap<String, HashSet<String>> = HashMap::new();
        for (i, node) in tree.nodes.iter().enumerate() {
            let parent = usize::try_from(node.parent).ok().filter(|p| *p < i);
            let masked = node.color == pb::Color::Red as i32 || parent.is_some_and(|p| func[p].is_none());
            if masked {
                func.push(None);
                continue;
            }
            let f = format!("{}:{}", node.module, node.function);
            if let Some(pf) = parent.and_then(|p| func[p].clone()) {
                let e = edge_key(&pf, &f);
                if node.color == pb::Color::White as i32 {
                    calls.insert(e.clone(), node.calls);
                }
                calls.entry(e.clone()).or_insert(0);
                children.entry(pf).or_default().insert(f.clone());
                edge[i] = Some(e);
            }
            func.push(Some(f));
        }
        let total: u64 = calls.values().sum();
        let share =
            calls.into_iter().map(|(e, c)| (e, if total == 0 { 0.0 } else { c as f32 / total as f32 })).collect();
        TreeView { func, edge, share, children }
    }
}

impl NormalProfile {
    /// The profile of normal windows given as (run, tree).
    pub fn build<'a>(trees: impl IntoIterator<Item = (i64, &'a pb::Tree)>) -> NormalProfile {
        let mut p = NormalProfile::default();
        for (run, tree) in trees {
            let v = TreeView::of(tree);
            let part = p.runs.entry(run).or_default();
            let seen: HashSet<&String> = v.func.iter().flatten().collect();
            for f in seen {
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

    /// The [`DEVIATION`] features of every node of `tree`, row-major, masked nodes included
    /// (as zeros); all zeros for an empty profile.
    pub(crate) fn features(&self, view: &TreeView) -> Vec<[f32; DEVIATION]> {
        let n = view.func.len();
        if self.is_empty() {
            return vec![[0.0; DEVIATION]; n];
        }
        let m = self;
        (0..n)
            .map(|i| {
                let Some(f) = &view.func[i] else { return [0.0; DEVIATION] };
                let new_function = !m.functions.contains_key(f);
                let (new_edge, out_of_range) = match &view.edge[i] {
                    None => (false, 0.0),
                    Some(e) => match m.edges.get(e) {
                        None => (true, 0.0),
                        Some(r) => (false, outside(view.share.get(e).copied().unwrap_or(0.0), r)),
                    },
                };
                let missing = m.always.get(f).map_or(0.0, |always| {
                    let have = view.children.get(f);
                    let lacking = always.iter().filter(|c| have.is_none_or(|h| !h.contains(*c))).count();
                    lacking as f32 / always.len() as f32
                });
                [new_edge as u8 as f32, new_function as u8 as f32, missing, out_of_range]
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

    fn tree(nodes: Vec<pb::TreeNode>) -> pb::Tree {
        pb::Tree { nodes, truncated: false }
    }

    #[test]
    fn new_edges_missing_children_and_shares_out_of_range() {
        // Normal: loop -> {read, reply}, read 9 calls and reply 1 (or 8 and 2).
        let n1 = tree(vec![node("loop", -1, 1), node("read", 0, 9), node("reply", 0, 1)]);
        let n2 = tree(vec![node("loop", -1, 1), node("read", 0, 8), node("reply", 0, 2)]);
        let p = NormalProfile::build([(1, &n1), (2, &n2)]);
        assert_eq!(p.runs(), 2);
        let f = |t: &pb::Tree| p.features(&TreeView::of(t));
        assert!(f(&n1).iter().all(|x| *x == [0.0; DEVIATION]), "a normal tree deviates nowhere: {:?}", f(&n1));
        // A crash after read: reply is missing under loop; a new function `panic` under read.
        let crash = tree(vec![node("loop", -1, 1), node("read", 0, 9), node("panic", 1, 1)]);
        let x = f(&crash);
        assert_eq!(x[0][2], 0.5, "loop lacks one of its two always-children");
        assert_eq!((x[2][0], x[2][1]), (1.0, 1.0), "panic: a new edge and a new function");
        // Shares out of range: reply at 10 of 11 calls, against 10-20%.
        let slow = tree(vec![node("loop", -1, 0), node("read", 0, 1), node("reply", 0, 10)]);
        let y = f(&slow);
        assert!(y[2][3] > 0.5 && y[1][3] > 0.5, "{y:?}");
        // Leave-one-run-out: n1's own edges stay known through run 2, and a profile of nothing
        // gives zeros.
        assert!(p.without(1).features(&TreeView::of(&n1)).iter().all(|x| x[0] == 0.0 && x[1] == 0.0));
        assert!(NormalProfile::default().features(&TreeView::of(&crash)).iter().all(|x| *x == [0.0; DEVIATION]));
        let mut back: NormalProfile = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        back.index();
        assert_eq!(back, p);
        assert_eq!(back.features(&TreeView::of(&crash)), x, "stored with the model, it reads the same");
    }
}
