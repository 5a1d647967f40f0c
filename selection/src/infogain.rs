//! Fault-aware trace point selection after *Machine Deserves Better Logging*
//! (003_66752515dbb921be.txt, sec. III): anomaly flags of the faults in the FDDB, the fault x
//! flag matrix (eq. 3), and information-gain selection (its Algorithm 1) of the fewest flags,
//! and so trace points, that tell the most faults apart.
//!
//! The paper flags deviations of a log stream from a temporal control-flow graph; afetm has
//! call trees, so a flag is a deviation of a fault run's full-trace FCT from the normal FCTs:
//! * [`Flag::Unexpected`]: an edge parent -> child no normal tree has (the paper's redundancy
//!   anomaly); tracing the child shows it, since every event carries its caller;
//! * [`Flag::Missing`]: a child the parent calls in every normal tree where the parent occurs,
//!   absent under it (sequence anomaly); it needs the parent and the child traced;
//! * [`Flag::Calls`]: an edge whose calls fall outside the normal range widened by
//!   [`CALLS_SLACK`] (the paper's latency anomaly has no counterpart in a call tree; call
//!   counts are what a tree has); tracing the child counts them.
//!
//! A fault's row holds the flags that at least half of its runs raised in a faulty tree.
//! [`select`] is the paper's recursion: pick the flag with the largest gain over the current
//! set of faults, split the set by it, recurse into both halves until a set holds one fault or
//! no flag gains. Flags come back shallowest split first, so a budget that cannot take them
//! all keeps the ones that split the most faults ([`points_within`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use afetm_proto as pb;
use serde::{Deserialize, Serialize};

/// A call count is anomalous outside `[min / CALLS_SLACK, max * CALLS_SLACK]` of the normal
/// trees' counts on that edge.
pub const CALLS_SLACK: f64 = 1.5;

/// A deviation of a fault run's tree from the normal trees (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Flag {
    /// An edge never seen in a normal tree.
    Unexpected {
        /// The caller.
        parent: String,
        /// The callee.
        child: String,
    },
    /// A child always called in normal trees, absent.
    Missing {
        /// The caller.
        parent: String,
        /// The callee.
        child: String,
    },
    /// Calls on an edge out of the normal range.
    Calls {
        /// The caller.
        parent: String,
        /// The callee.
        child: String,
    },
}

impl Flag {
    /// The functions that must be traced for the flag to show.
    pub fn points(&self) -> Vec<&str> {
        match self {
            Flag::Unexpected { child, .. } | Flag::Calls { child, .. } => vec![child.as_str()],
            Flag::Missing { parent, child } => vec![parent.as_str(), child.as_str()],
        }
    }
}

impl std::fmt::Display for Flag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flag::Unexpected { parent, child } => write!(f, "unexpected {parent} -> {child}"),
            Flag::Missing { parent, child } => write!(f, "missing {parent} -> {child}"),
            Flag::Calls { parent, child } => write!(f, "calls out of range on {parent} -> {child}"),
        }
    }
}

/// A tree's edges (caller, callee) with their calls summed over the tree, and its functions.
fn edges(tree: &pb::Tree) -> (HashMap<(&str, &str), u64>, HashSet<&str>) {
    let mut e: HashMap<(&str, &str), u64> = HashMap::new();
    let mut f = HashSet::new();
    for n in &tree.nodes {
        f.insert(n.function.as_str());
        if let Some(p) = usize::try_from(n.parent).ok().and_then(|p| tree.nodes.get(p)) {
            *e.entry((p.function.as_str(), n.function.as_str())).or_default() += n.calls;
        }
    }
    (e, f)
}

/// What the normal trees do: each edge's call range, and the children a parent always calls.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    range: HashMap<(String, String), (u64, u64)>,
    always: HashMap<String, BTreeSet<String>>,
}

impl Profile {
    /// The profile of `normal` trees.
    pub fn new<'a>(normal: impl IntoIterator<Item = &'a pb::Tree>) -> Profile {
        let mut p = Profile::default();
        for t in normal {
            let (e, functions) = edges(t);
            let mut children: HashMap<&str, BTreeSet<String>> = HashMap::new();
            for ((a, b), calls) in &e {
                let r = p.range.entry((a.to_string(), b.to_string())).or_insert((u64::MAX, 0));
                *r = (r.0.min(*calls), r.1.max(*calls));
                children.entry(a).or_default().insert(b.to_string());
            }
            for f in functions {
                let mine = children.remove(f).unwrap_or_default();
                match p.always.get_mut(f) {
                    Some(s) => s.retain(|c| mine.contains(c)),
                    None => {
                        p.always.insert(f.to_string(), mine);
                    }
                }
            }
        }
        p
    }

    /// The flags `tree` raises against the profile.
    pub fn flags(&self, tree: &pb::Tree) -> BTreeSet<Flag> {
        let (e, functions) = edges(tree);
        let mut out = BTreeSet::new();
        for ((a, b), calls) in &e {
            let (parent, child) = (a.to_string(), b.to_string());
            match self.range.get(&(parent.clone(), child.clone())) {
                None => {
                    out.insert(Flag::Unexpected { parent, child });
                }
                Some((lo, hi)) => {
                    let c = *calls as f64;
                    if c < *lo as f64 / CALLS_SLACK || c > *hi as f64 * CALLS_SLACK {
                        out.insert(Flag::Calls { parent, child });
                    }
                }
            }
        }
        for f in functions {
            for c in self.always.get(f).into_iter().flatten() {
                if !e.contains_key(&(f, c.as_str())) {
                    out.insert(Flag::Missing { parent: f.to_string(), child: c.clone() });
                }
            }
        }
        out
    }
}

/// Eq. 3's matrix: one row per fault, one column per flag, 1 where the fault raises the flag.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Matrix {
    /// Row names (a fault class, e.g. `setGenericCommand/crash`).
    pub faults: Vec<String>,
    /// Columns.
    pub flags: Vec<Flag>,
    /// `rows[i][j]`: fault `i` raises flag `j`.
    pub rows: Vec<Vec<bool>>,
}

impl Matrix {
    /// The matrix of faults whose runs raised `runs[fault]` (one flag set per run): a fault
    /// raises a flag when at least half of its runs do.
    pub fn from_runs(runs: &HashMap<String, Vec<BTreeSet<Flag>>>) -> Matrix {
        let mut faults: Vec<String> = runs.keys().cloned().collect();
        faults.sort();
        let mut kept: BTreeSet<Flag> = BTreeSet::new();
        let mut per: Vec<BTreeSet<Flag>> = Vec::new();
        for f in &faults {
            let sets = &runs[f];
            let mut count: HashMap<&Flag, usize> = HashMap::new();
            for s in sets {
                for flag in s {
                    *count.entry(flag).or_default() += 1;
                }
            }
            let row: BTreeSet<Flag> =
                count.into_iter().filter(|(_, n)| 2 * n >= sets.len()).map(|(f, _)| f.clone()).collect();
            kept.extend(row.iter().cloned());
            per.push(row);
        }
        let flags: Vec<Flag> = kept.into_iter().collect();
        let rows = per.iter().map(|row| flags.iter().map(|f| row.contains(f)).collect()).collect();
        Matrix { faults, flags, rows }
    }
}

fn entropy(n: usize) -> f64 {
    // Rows are distinct faults, each its own class: Info(D) = log2 |D|.
    if n <= 1 { 0.0 } else { (n as f64).log2() }
}

/// The paper's Algorithm 1: flag columns in the order chosen, shallowest split first.
pub fn select(m: &Matrix) -> Vec<usize> {
    let mut chosen: Vec<(usize, usize, usize)> = Vec::new();
    let mut seq = 0;
    let all: Vec<usize> = (0..m.faults.len()).collect();
    split(m, &all, 0, &mut seq, &mut chosen);
    chosen.sort();
    let mut seen = HashSet::new();
    chosen.into_iter().map(|c| c.2).filter(|j| seen.insert(*j)).collect()
}

fn split(m: &Matrix, rows: &[usize], depth: usize, seq: &mut usize, chosen: &mut Vec<(usize, usize, usize)>) {
    if rows.len() <= 1 {
        return;
    }
    let info = entropy(rows.len());
    let mut best: Option<(f64, usize)> = None;
    for j in 0..m.flags.len() {
        let ones = rows.iter().filter(|&&r| m.rows[r][j]).count();
        let zeros = rows.len() - ones;
        let cond = (ones as f64 * entropy(ones) + zeros as f64 * entropy(zeros)) / rows.len() as f64;
        let gain = info - cond;
        if gain > 1e-12 && best.is_none_or(|(g, _)| gain > g + 1e-12) {
            best = Some((gain, j));
        }
    }
    let Some((_, j)) = best else { return };
    chosen.push((depth, *seq, j));
    *seq += 1;
    let (a, b): (Vec<usize>, Vec<usize>) = rows.iter().partition(|&&r| m.rows[r][j]);
    split(m, &a, depth + 1, seq, chosen);
    split(m, &b, depth + 1, seq, chosen);
}

/// How many faults the flags `chosen` tell apart: the number of distinct rows they leave.
pub fn distinguished(m: &Matrix, chosen: &[usize]) -> usize {
    let sigs: HashSet<Vec<bool>> = m.rows.iter().map(|r| chosen.iter().map(|&j| r[j]).collect()).collect();
    sigs.len()
}

/// The trace points of the flags in `order`, taking a flag only while the points' weights
/// stay within `bound` (a flag that does not fit is skipped, later ones may). `weight` is a
/// function's weight, `None` for a function the program does not have (its flags are
/// skipped). Returns the functions, in the order they were added.
pub fn points_within<'a>(
    m: &'a Matrix,
    order: &[usize],
    bound: f64,
    weight: impl Fn(&str) -> Option<f64>,
) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    let mut used = 0.0;
    for &j in order {
        let new: Vec<&str> = m.flags[j].points().into_iter().filter(|p| !out.contains(p)).collect();
        let Some(w) = new.iter().map(|p| weight(p)).sum::<Option<f64>>() else { continue };
        if used + w <= bound {
            used += w;
            out.extend(new);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(i: usize) -> Flag {
        Flag::Unexpected { parent: "p".into(), child: format!("f{i}") }
    }

    fn matrix(rows: &[[u8; 5]]) -> Matrix {
        Matrix {
            faults: (0..rows.len()).map(|i| format!("fault{i}")).collect(),
            flags: (0..5).map(flag).collect(),
            rows: rows.iter().map(|r| r.iter().map(|x| *x == 1).collect()).collect(),
        }
    }

    #[test]
    fn picks_the_known_minimal_set() {
        // Four faults; columns 0 and 1 together tell all four apart. Column 2 is raised by
        // every fault (no gain), 3 only by fault 0 and 4 duplicates column 0.
        let m = matrix(&[[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [0, 0, 1, 0, 0]]);
        let chosen = select(&m);
        assert_eq!(chosen, [0, 1]);
        assert_eq!(distinguished(&m, &chosen), 4);
    }

    #[test]
    fn stops_where_nothing_tells_faults_apart() {
        let m = matrix(&[[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]);
        assert_eq!(select(&m), [0]);
        assert_eq!(distinguished(&m, &[0]), 2);
    }

    fn tree(edges: &[(&str, Option<usize>, u64)]) -> pb::Tree {
        pb::Tree {
            nodes: edges
                .iter()
                .map(|(f, p, c)| pb::TreeNode {
                    function: f.to_string(),
                    parent: p.map_or(-1, |p| p as i32),
                    calls: *c,
                    ..Default::default()
                })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn flags_of_a_tree_against_normal_trees() {
        let normal = [
            tree(&[("main", None, 1), ("a", Some(0), 10), ("b", Some(0), 2)]),
            tree(&[("main", None, 1), ("a", Some(0), 12), ("c", Some(0), 1)]),
        ];
        let p = Profile::new(&normal);
        // a is always called by main, b and c only sometimes; d never.
        let faulty = tree(&[("main", None, 1), ("b", Some(0), 2), ("d", Some(0), 1)]);
        let f: Vec<String> = p.flags(&faulty).iter().map(|f| f.to_string()).collect();
        assert_eq!(f, ["unexpected main -> d", "missing main -> a"]);
        let many = tree(&[("main", None, 1), ("a", Some(0), 40)]);
        let f: Vec<String> = p.flags(&many).iter().map(|f| f.to_string()).collect();
        assert_eq!(f, ["calls out of range on main -> a"]);
        assert!(p.flags(&normal[0]).is_empty());
    }

    #[test]
    fn a_fault_row_needs_half_its_runs_and_the_budget_keeps_the_first_splits() {
        let mut runs = HashMap::new();
        runs.insert(
            "x".to_string(),
            vec![BTreeSet::from([flag(0)]), BTreeSet::from([flag(0), flag(1)]), BTreeSet::new()],
        );
        runs.insert("y".to_string(), vec![BTreeSet::from([flag(1)])]);
        let m = Matrix::from_runs(&runs);
        assert_eq!(m.faults, ["x", "y"]);
        assert_eq!(m.flags, [flag(0), flag(1)]);
        assert_eq!(m.rows, [[true, false], [false, true]]);
        let order = select(&m);
        assert_eq!(order.len(), 1);
        let w = |f: &str| Some(if f == "f0" { 5.0 } else { 1.0 });
        assert_eq!(points_within(&m, &[0, 1], 10.0, w), ["f0", "f1"]);
        assert_eq!(points_within(&m, &[0, 1], 2.0, w), ["f1"]);
    }
}
