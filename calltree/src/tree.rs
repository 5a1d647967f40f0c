//! Function call trees as the paper uses them: FCTs, colored FCTs (Alg. 2) and AFCTs (Alg. 3).
//!
//! A [`Forest`] is an arena of nodes in preorder. Nodes name a function through a [`FuncId`]
//! handed out by a [`FuncTable`]; children are kept sorted by function so two trees built from
//! the same calls compare equal node by node whatever order the events arrived in.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use afetm_proto as pb;

/// Index of a function in a [`FuncTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncId(pub u32);

/// A function: the module it lives in (basename) and its symbol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Func {
    pub module: Arc<str>,
    pub name: Arc<str>,
}

impl std::fmt::Display for Func {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}!{}", self.module, self.name)
    }
}

/// Interns functions so trees store small ids.
#[derive(Default, Debug, Clone)]
pub struct FuncTable {
    funcs: Vec<Func>,
    ids: HashMap<Func, FuncId>,
}

impl FuncTable {
    pub fn intern(&mut self, module: &str, name: &str) -> FuncId {
        let func = Func { module: module.into(), name: name.into() };
        if let Some(id) = self.ids.get(&func) {
            return *id;
        }
        let id = FuncId(self.funcs.len() as u32);
        self.funcs.push(func.clone());
        self.ids.insert(func, id);
        id
    }

    /// Functions interned so far; ids are `0..len`.
    pub fn len(&self) -> usize {
        self.funcs.len()
    }

    /// Whether nothing was interned.
    pub fn is_empty(&self) -> bool {
        self.funcs.is_empty()
    }

    pub fn get(&self, id: FuncId) -> &Func {
        &self.funcs[id.0 as usize]
    }

    pub fn lookup(&self, module: &str, name: &str) -> Option<FuncId> {
        self.ids.get(&Func { module: module.into(), name: name.into() }).copied()
    }

    /// Functions whose name is `name` (any module) or whose `module:name` is `name`.
    pub fn matching<'a>(&'a self, name: &'a str) -> impl Iterator<Item = FuncId> + 'a {
        self.funcs.iter().enumerate().filter_map(move |(i, f)| {
            let qualified = name.split_once(':').is_some_and(|(m, n)| *f.module == *m && *f.name == *n);
            (qualified || *f.name == *name).then_some(FuncId(i as u32))
        })
    }
}

/// Node colors of Alg. 2. AFCT nodes are white (traced) or blue (known only from a caller
/// attribute or a call stack).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Color {
    White,
    Red,
    Blue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub func: FuncId,
    pub color: Color,
    pub parent: Option<u32>,
    pub children: Vec<u32>,
    /// Calls observed on the edge parent -> this node (0 when the edge was inferred).
    pub calls: u64,
}

/// A forest stored in preorder (every node comes after its parent, subtrees are contiguous).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forest {
    pub nodes: Vec<Node>,
    /// Set when a node cap stopped construction early.
    pub truncated: bool,
}

impl Forest {
    pub fn roots(&self) -> impl Iterator<Item = u32> + '_ {
        self.nodes.iter().enumerate().filter(|(_, n)| n.parent.is_none()).map(|(i, _)| i as u32)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn push(&mut self, func: FuncId, color: Color, parent: Option<u32>, calls: u64) -> u32 {
        let id = self.nodes.len() as u32;
        self.nodes.push(Node { func, color, parent, children: Vec::new(), calls });
        if let Some(p) = parent {
            self.nodes[p as usize].children.push(id);
        }
        id
    }

    /// A copy without the nodes `keep` rejects, together with their subtrees. Preorder is kept.
    pub fn filtered(&self, keep: impl Fn(&Node) -> bool) -> Forest {
        let mut out = Forest { nodes: Vec::with_capacity(self.nodes.len()), truncated: self.truncated };
        let mut map: Vec<Option<u32>> = vec![None; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            let parent = match n.parent {
                Some(p) => match map[p as usize] {
                    Some(np) => Some(np),
                    None => continue, // parent dropped: drop the subtree
                },
                None => None,
            };
            if !keep(n) {
                continue;
            }
            map[i] = Some(out.push(n.func, n.color, parent, n.calls));
        }
        out
    }

    /// Depth of every node by index (roots 0): for a node of a full FCT, the number of frames
    /// above the call, i.e. the length of its call chain. One pass: parents come first.
    pub fn depths(&self) -> Vec<u32> {
        let mut depth: Vec<u32> = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let d = n.parent.and_then(|p| depth.get(p as usize)).map_or(0, |d| d + 1);
            depth.push(d);
        }
        depth
    }

    /// The nodes in canonical order: preorder, roots and children sorted by function name
    /// (children of one node are distinct functions: a tree unrolls a caller -> callee graph,
    /// so the order is unique). [`Forest::canonical`] and the calls vectors use it.
    fn canonical_order(&self, table: &FuncTable) -> Vec<u32> {
        let by_name =
            |a: &u32, b: &u32| table.get(self.nodes[*a as usize].func).cmp(table.get(self.nodes[*b as usize].func));
        let mut roots: Vec<u32> = self.roots().collect();
        roots.sort_by(by_name);
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack: Vec<u32> = roots.into_iter().rev().collect();
        while let Some(n) = stack.pop() {
            out.push(n);
            let mut kids = self.nodes[n as usize].children.clone();
            kids.sort_by(by_name);
            stack.extend(kids.into_iter().rev());
        }
        out
    }

    /// A canonical, table-independent description: one line per node, `depth name color`, in
    /// preorder with children sorted by name. Two forests with equal shapes, names and colors
    /// have equal canonical forms, whatever their function tables or child order.
    pub fn canonical(&self, table: &FuncTable) -> Vec<String> {
        let mut depth = vec![0usize; self.nodes.len()];
        self.canonical_order(table)
            .into_iter()
            .map(|n| {
                let node = &self.nodes[n as usize];
                let d = node.parent.map_or(0, |p| depth[p as usize] + 1);
                depth[n as usize] = d;
                format!("{d} {} {:?}", table.get(node.func), node.color)
            })
            .collect()
    }

    /// Every node's `calls` in canonical order: with [`Forest::hash`], what a window's tree
    /// holds (the FDDB keeps one tree per hash and these per window).
    pub fn canonical_calls(&self, table: &FuncTable) -> Vec<u64> {
        self.canonical_order(table).into_iter().map(|n| self.nodes[n as usize].calls).collect()
    }

    /// Sets every node's `calls` from [`Forest::canonical_calls`] of a forest with the same
    /// hash; refused when the lengths differ.
    pub fn set_canonical_calls(&mut self, table: &FuncTable, calls: &[u64]) -> Result<(), String> {
        if calls.len() != self.nodes.len() {
            return Err(format!("{} calls for a tree of {} nodes", calls.len(), self.nodes.len()));
        }
        for (n, c) in self.canonical_order(table).into_iter().zip(calls) {
            self.nodes[n as usize].calls = *c;
        }
        Ok(())
    }

    /// The SHA-256 of [`Forest::canonical`], as hex: equal for structurally equal trees (the
    /// FDDB's identity of an FCT; calls on edges do not count, see
    /// [`Forest::canonical_calls`]).
    pub fn hash(&self, table: &FuncTable) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for line in self.canonical(table) {
            h.update(line.as_bytes());
            h.update(b"\n");
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Indented text rendering for people.
    pub fn render(&self, table: &FuncTable) -> String {
        let mut s = String::new();
        let mut depth = vec![0usize; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            let d = n.parent.map(|p| depth[p as usize] + 1).unwrap_or(0);
            depth[i] = d;
            let color = match n.color {
                Color::White => "white",
                Color::Red => "red",
                Color::Blue => "blue",
            };
            let _ = writeln!(s, "{:indent$}{} [{color}] calls={}", "", table.get(n.func), n.calls, indent = d * 2);
        }
        if self.truncated {
            s.push_str("... (truncated at the node cap)\n");
        }
        s
    }

    pub fn to_proto(&self, table: &FuncTable) -> pb::Tree {
        pb::Tree {
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    let f = table.get(n.func);
                    pb::TreeNode {
                        function: f.name.to_string(),
                        module: f.module.to_string(),
                        color: match n.color {
                            Color::White => pb::Color::White,
                            Color::Red => pb::Color::Red,
                            Color::Blue => pb::Color::Blue,
                        } as i32,
                        parent: n.parent.map(|p| p as i32).unwrap_or(-1),
                        children: n.children.clone(),
                        calls: n.calls,
                    }
                })
                .collect(),
            truncated: self.truncated,
        }
    }

    /// Rebuilds a forest from its wire form, checking every index.
    pub fn from_proto(tree: &pb::Tree, table: &mut FuncTable) -> Result<Forest, String> {
        let mut out = Forest { nodes: Vec::with_capacity(tree.nodes.len()), truncated: tree.truncated };
        for (i, n) in tree.nodes.iter().enumerate() {
            let parent = match n.parent {
                -1 => None,
                p if p >= 0 && (p as usize) < i => Some(p as u32),
                p => return Err(format!("node {i}: parent {p} is not an earlier node")),
            };
            let color = match pb::Color::try_from(n.color) {
                Ok(pb::Color::White) => Color::White,
                Ok(pb::Color::Red) => Color::Red,
                Ok(pb::Color::Blue) => Color::Blue,
                _ => return Err(format!("node {i}: bad color {}", n.color)),
            };
            let func = table.intern(&n.module, &n.function);
            out.push(func, color, parent, n.calls);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_count_the_frames_above_each_node() {
        let mut t = FuncTable::default();
        let (a, b, c) = (t.intern("m", "a"), t.intern("m", "b"), t.intern("m", "c"));
        let mut f = Forest::default();
        let root = f.push(a, Color::White, None, 1);
        let x = f.push(b, Color::White, Some(root), 1);
        f.push(c, Color::Blue, Some(x), 0);
        f.push(c, Color::White, Some(root), 2);
        f.push(a, Color::White, None, 1);
        assert_eq!(f.depths(), vec![0, 1, 2, 1, 0]);
    }

    #[test]
    fn a_window_s_calls_move_onto_the_stored_tree_of_its_hash() {
        // Two windows of one shape, built in another child order and with other counts.
        let mut t = FuncTable::default();
        let (a, b, c, d) = (t.intern("m", "a"), t.intern("m", "b"), t.intern("m", "c"), t.intern("m", "d"));
        let mut first = Forest::default();
        let r = first.push(a, Color::White, None, 0);
        let x = first.push(b, Color::White, Some(r), 3);
        first.push(d, Color::White, Some(x), 7);
        first.push(c, Color::White, Some(r), 5);
        let mut later = Forest::default();
        let r = later.push(a, Color::White, None, 0);
        later.push(c, Color::White, Some(r), 50);
        let x = later.push(b, Color::White, Some(r), 30);
        later.push(d, Color::White, Some(x), 70);
        assert_eq!(first.hash(&t), later.hash(&t));
        assert_eq!(later.canonical_calls(&t), vec![0, 30, 70, 50]);
        let mut stored = first.clone();
        stored.set_canonical_calls(&t, &later.canonical_calls(&t)).unwrap();
        let calls_of = |f: &Forest, func| f.nodes.iter().find(|n| n.func == func).unwrap().calls;
        assert_eq!([b, c, d].map(|f| calls_of(&stored, f)), [30, 50, 70]);
        assert!(stored.set_canonical_calls(&t, &[1, 2]).unwrap_err().contains("2 calls for a tree of 4 nodes"));
    }
}
