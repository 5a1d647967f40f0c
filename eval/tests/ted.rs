//! Zhang-Shasha against the recursive definition of the forest edit distance on random small
//! forests, and hand-made cases with known distances.
use afetm_eval::ted::{TedTree, distance, nearest};
use proptest::prelude::*;

/// A node of an owned forest for the brute force.
#[derive(Clone, Debug)]
struct N(u32, Vec<N>);

/// The recursive definition (rightmost roots), no memo: exponential, fine below ~7 nodes.
fn brute(f: &[N], g: &[N]) -> u32 {
    match (f.last(), g.last()) {
        (None, None) => 0,
        (Some(_), None) => brute(&without_root(f), g) + 1,
        (None, Some(_)) => brute(f, &without_root(g)) + 1,
        (Some(v), Some(w)) => {
            let del = brute(&without_root(f), g) + 1;
            let ins = brute(f, &without_root(g)) + 1;
            let matched = brute(&f[..f.len() - 1], &g[..g.len() - 1]) + brute(&v.1, &w.1) + u32::from(v.0 != w.0);
            del.min(ins).min(matched)
        }
    }
}

/// The forest with its rightmost root removed (its children take its place).
fn without_root(f: &[N]) -> Vec<N> {
    let mut out = f[..f.len() - 1].to_vec();
    out.extend(f[f.len() - 1].1.iter().cloned());
    out
}

fn preorder(f: &[N], parent: Option<usize>, out: &mut Vec<(u32, Option<usize>)>) {
    for n in f {
        let me = out.len();
        out.push((n.0, parent));
        preorder(&n.1, Some(me), out);
    }
}

fn ted(f: &[N]) -> TedTree {
    let mut nodes = Vec::new();
    preorder(f, None, &mut nodes);
    TedTree::from_preorder(&nodes).expect("valid preorder")
}

fn forest(max_nodes: usize) -> impl Strategy<Value = Vec<N>> {
    // Labels from a small alphabet so that matches happen.
    let leaf = (0u32..3).prop_map(|l| N(l, Vec::new()));
    let tree = leaf.prop_recursive(3, max_nodes as u32, 3, |inner| {
        ((0u32..3), prop::collection::vec(inner, 0..3)).prop_map(|(l, c)| N(l, c))
    });
    prop::collection::vec(tree, 0..3).prop_filter("small", move |f| size(f) <= max_nodes)
}

fn size(f: &[N]) -> usize {
    f.iter().map(|n| 1 + size(&n.1)).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn zhang_shasha_equals_the_definition(f in forest(6), g in forest(6)) {
        let (a, b) = (ted(&f), ted(&g));
        // Both sides get the same virtual root, which always matches at cost 0.
        prop_assert_eq!(distance(&a, &b), brute(&f, &g));
        prop_assert_eq!(distance(&a, &b), distance(&b, &a));
        prop_assert!(a.lower_bound(&b) <= distance(&a, &b));
    }
}

#[test]
fn known_distances() {
    // a(b, c) vs a(c): delete b.
    let x = [N(0, vec![N(1, vec![]), N(2, vec![])])];
    let y = [N(0, vec![N(2, vec![])])];
    assert_eq!(distance(&ted(&x), &ted(&y)), 1);
    // a(b(c)) vs a(c): delete b, c moves up.
    let z = [N(0, vec![N(1, vec![N(2, vec![])])])];
    assert_eq!(distance(&ted(&z), &ted(&y)), 1);
    // Relabel the root.
    let w = [N(5, vec![N(2, vec![])])];
    assert_eq!(distance(&ted(&w), &ted(&y)), 1);
    assert_eq!(distance(&ted(&x), &ted(&x)), 0);
    // Empty forest vs 3 nodes.
    assert_eq!(distance(&ted(&[]), &ted(&x)), 3);
}

#[test]
fn nearest_is_exact_with_pruning() {
    let trees: Vec<Vec<N>> = vec![
        vec![N(0, vec![N(1, vec![]), N(2, vec![]), N(3, vec![])])],
        vec![N(0, vec![N(1, vec![])])],
        vec![N(0, vec![N(1, vec![]), N(2, vec![])])],
    ];
    let cands: Vec<TedTree> = trees.iter().map(|t| ted(t)).collect();
    let cands: Vec<&TedTree> = cands.iter().collect();
    let probe = ted(&[N(0, vec![N(1, vec![]), N(2, vec![]), N(4, vec![])])]);
    assert_eq!(nearest(&probe, &cands), Some((1, 0)));
    assert_eq!(nearest(&probe, &[]), None);
}
