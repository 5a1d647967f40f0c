//! FCT coloring: AFETM Algorithm 2 (sec. III.B.1).
//!
//! Given normal FCTs and the trace point set F, every node is white when its function is in F,
//! otherwise red; a red node with a white descendant turns blue and the first white node of its
//! subtree in preorder joins F^callstack: that function records its call stack, which is what
//! lets Alg. 3 restore the blue (untraced) functions above it. Linear in the number of nodes: for
//! each node the first white descendant in preorder is found bottom-up once.

use std::collections::{BTreeSet, HashSet};

use crate::tree::{Color, Forest, FuncId};

/// Output of [`color`]: the colored FCTs and F^callstack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Colored {
    pub fcts: Vec<Forest>,
    pub callstack: BTreeSet<FuncId>,
}

/// Alg. 2: colors `fcts` against the trace point set `traced` (the paper's F).
pub fn color(fcts: &[Forest], traced: &HashSet<FuncId>) -> Colored {
    let mut callstack = BTreeSet::new();
    let mut out = Vec::with_capacity(fcts.len());
    for fct in fcts {
        let mut colored = fct.clone();
        // Lines 2-6: white if traced, red otherwise.
        for node in &mut colored.nodes {
            node.color = if traced.contains(&node.func) { Color::White } else { Color::Red };
        }
        // Lines 7-13: first white strict descendant in preorder, computed children-first.
        // Preorder storage means every child has a larger index than its parent.
        let n = colored.nodes.len();
        let mut first_white: Vec<Option<u32>> = vec![None; n];
        for i in (0..n).rev() {
            let found = colored.nodes[i].children.iter().find_map(|&c| {
                if colored.nodes[c as usize].color == Color::White { Some(c) } else { first_white[c as usize] }
            });
            first_white[i] = found;
        }
        for (i, first) in first_white.iter().enumerate() {
            if let (Color::Red, Some(w)) = (colored.nodes[i].color, first) {
                colored.nodes[i].color = Color::Blue;
                callstack.insert(colored.nodes[*w as usize].func);
            }
        }
        out.push(colored);
    }
    Colored { fcts: out, callstack }
}

/// The colored FCT with its red nodes masked, i.e. what an AFCT of the same run should equal.
/// Red nodes have no white descendant, so removing them removes whole subtrees.
pub fn mask_red(colored: &Forest) -> Forest {
    colored.filtered(|n| n.color != Color::Red)
}

/// The paper's equivalence claim, checked: each AFCT must equal the colored FCT of the same
/// thread with its red nodes masked. Threads are matched by their root functions (thread ids
/// differ between runs). Returns one line per mismatch; empty means equivalent.
pub fn compare_threads(masked_fcts: &[Forest], afcts: &[Forest], table: &crate::tree::FuncTable) -> Vec<String> {
    fn key(f: &Forest, t: &crate::tree::FuncTable) -> Vec<String> {
        f.canonical(t).into_iter().filter(|l| l.starts_with("0 ")).collect()
    }
    let mut problems = Vec::new();
    let mut unmatched: Vec<&Forest> = afcts.iter().collect();
    for fct in masked_fcts.iter().filter(|f| !f.is_empty()) {
        let k = key(fct, table);
        let Some(pos) = unmatched.iter().position(|a| key(a, table) == k) else {
            problems.push(format!("no AFCT has the roots {k:?}"));
            continue;
        };
        let afct = unmatched.remove(pos);
        let (want, got) = (fct.canonical(table), afct.canonical(table));
        if want != got {
            let at = want.iter().zip(&got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
            problems.push(format!(
                "roots {k:?}: masked FCT has {} nodes, AFCT {}; first difference at line {at}: {:?} vs {:?}",
                want.len(),
                got.len(),
                want.get(at),
                got.get(at)
            ));
        }
    }
    for a in unmatched.iter().filter(|a| !a.is_empty()) {
        problems.push(format!("AFCT with roots {:?} has no FCT", key(a, table)));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        afct::{DEFAULT_NODE_CAP, TraceData},
        tree::FuncTable,
    };

    /// Builds an FCT from (callee, caller) pairs of a full trace.
    fn fct(t: &mut FuncTable, calls: &[(&str, &str)]) -> Forest {
        let mut d = TraceData::new();
        for (callee, caller) in calls {
            let (f, c) = (t.intern("m", callee), t.intern("m", caller));
            d.add_call(f, Some(c), &[]);
        }
        d.build(DEFAULT_NODE_CAP)
    }

    fn set(t: &FuncTable, names: &[&str]) -> HashSet<FuncId> {
        names.iter().map(|n| t.lookup("m", n).unwrap()).collect()
    }

    #[test]
    fn colors_follow_the_paper() {
        let mut t = FuncTable::default();
        // libc -> main -> {a -> {b -> c, d}, e}
        let f = fct(&mut t, &[("main", "libc"), ("a", "main"), ("b", "a"), ("c", "b"), ("d", "a"), ("e", "main")]);
        let traced = set(&t, &["main", "c"]);
        let out = color(&[f], &traced);
        let names: Vec<String> = out.fcts[0].canonical(&t);
        assert_eq!(
            names,
            vec![
                "0 m!libc Blue",
                "1 m!main White",
                "2 m!a Blue",
                "3 m!b Blue",
                "4 m!c White",
                "3 m!d Red",
                "2 m!e Red",
            ]
        );
        // libc's first white descendant is main; a's and b's is c.
        assert_eq!(out.callstack, set(&t, &["main", "c"]).into_iter().collect());
        let masked = mask_red(&out.fcts[0]);
        assert_eq!(
            masked.canonical(&t),
            vec!["0 m!libc Blue", "1 m!main White", "2 m!a Blue", "3 m!b Blue", "4 m!c White"]
        );
    }

    #[test]
    fn first_white_is_in_preorder_not_shallowest() {
        let mut t = FuncTable::default();
        // r -> { x -> deep, w }: preorder of r's subtree is x, deep, w: deep comes first.
        let f = fct(&mut t, &[("x", "r"), ("deep", "x"), ("w", "r")]);
        let out = color(&[f], &set(&t, &["deep", "w"]));
        assert_eq!(out.callstack, set(&t, &["deep"]).into_iter().collect());
    }

    #[test]
    fn recursion_in_fct_is_colored_once() {
        let mut t = FuncTable::default();
        let f = fct(&mut t, &[("main", "libc"), ("fib", "main"), ("fib", "fib"), ("leaf", "fib")]);
        let out = color(&[f], &set(&t, &["leaf"]));
        assert_eq!(out.fcts[0].canonical(&t), vec!["0 m!libc Blue", "1 m!main Blue", "2 m!fib Blue", "3 m!leaf White"]);
        assert_eq!(out.callstack, set(&t, &["leaf"]).into_iter().collect());
    }

    /// The paper's equivalence claim on a hand-made tree: tracing F with F^callstack recording
    /// stacks gives an AFCT equal to the colored FCT with red nodes masked.
    #[test]
    fn afct_of_a_partial_trace_equals_the_masked_colored_fct() {
        let mut t = FuncTable::default();
        let calls: &[(&str, &str)] =
            &[("main", "libc"), ("a", "main"), ("b", "a"), ("c", "b"), ("d", "a"), ("e", "main"), ("f", "e")];
        // Runtime call paths (a full trace with stacks) of the program the FCT describes.
        let paths: &[&[&str]] =
            &[&["libc", "main", "a", "b", "c"], &["libc", "main", "a", "d"], &["libc", "main", "e", "f"]];
        let full = fct(&mut t, calls);
        for traced_names in
            [&["c", "f"][..], &["main", "d"], &["b", "f"], &["main", "a", "b", "c", "d", "e", "f"], &["c"]]
        {
            let traced = set(&t, traced_names);
            let out = color(std::slice::from_ref(&full), &traced);
            // Replay the runtime paths through a partial tracer.
            let mut partial = TraceData::new();
            for path in paths {
                let ids: Vec<FuncId> = path.iter().map(|n| t.lookup("m", n).unwrap()).collect();
                for i in 1..ids.len() {
                    if traced.contains(&ids[i]) {
                        let stack: Vec<FuncId> = if out.callstack.contains(&ids[i]) {
                            ids[..i].iter().rev().copied().collect()
                        } else {
                            Vec::new()
                        };
                        partial.add_call(ids[i], Some(ids[i - 1]), &stack);
                    }
                }
            }
            let afct = partial.build(DEFAULT_NODE_CAP);
            assert_eq!(afct.canonical(&t), mask_red(&out.fcts[0]).canonical(&t), "F = {traced_names:?}");
        }
    }
}
