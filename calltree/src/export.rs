//! Call trees for people and their tools: Graphviz DOT, a self-contained SVG drawing, and a
//! Chrome trace (JSON) that ui.perfetto.dev and chrome://tracing open.
//!
//! Colors follow the paper's figures (Alg. 2): white nodes were traced, blue ones are known
//! only as callers or stack frames, red ones are the untraced nodes coloring found. A
//! highlighted function (a diagnosis's suspect) gets a thick crimson border.
//!
//! The SVG is drawn here rather than through Graphviz so that the web view and the CLI need no
//! external program: a tree needs only an indented layout (one row per node in preorder, x by
//! depth), which stays readable for the hundreds of nodes of a real AFCT.
//!
//! **What the Chrome trace approximates.** The analyzer keeps, per window and thread, the
//! call edges with their counts, not each call's timestamps, so calls cannot be placed in time.
//! The trace draws each AFCT node as one slice on its thread's track, nested as in the tree,
//! spread over the window's real time span. A slice's width is proportional to its calls,
//! and it is at least as wide as its children together. Start times and durations are
//! therefore layout, not measurement; each slice's `args` carry the real call count.
use std::{collections::HashSet, fmt::Write};

use crate::tree::{Color, Forest, FuncTable};

fn fill(c: Color) -> &'static str {
    match c {
        Color::White => "#ffffff",
        Color::Blue => "#9ecae1",
        Color::Red => "#fc9272",
    }
}

fn escape_dot(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn escape_xml(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The forest as a Graphviz digraph; edges are labelled with their calls.
pub fn dot(f: &Forest, table: &FuncTable, highlight: &HashSet<String>) -> String {
    let mut s =
        String::from("digraph afct {\n  rankdir=TB;\n  node [shape=box, style=filled, fontname=\"monospace\"];\n");
    for (i, n) in f.nodes.iter().enumerate() {
        let name = &table.get(n.func).name;
        let border = if highlight.contains(&**name) { ", color=\"crimson\", penwidth=3" } else { "" };
        let _ = writeln!(s, "  n{i} [label=\"{}\", fillcolor=\"{}\"{border}];", escape_dot(name), fill(n.color));
        if let Some(p) = n.parent {
            let _ = writeln!(s, "  n{p} -> n{i} [label=\"{}\"];", n.calls);
        }
    }
    if f.truncated {
        s.push_str("  truncated [shape=note, label=\"truncated at the node cap\"];\n");
    }
    s.push_str("}\n");
    s
}

/// Depth of every node (preorder: parents come first).
fn depths(f: &Forest) -> Vec<usize> {
    let mut depth = vec![0usize; f.nodes.len()];
    for (i, n) in f.nodes.iter().enumerate() {
        depth[i] = n.parent.map(|p| depth[p as usize] + 1).unwrap_or(0);
    }
    depth
}

/// Most nodes [`svg`] draws; a bigger tree is cut (and says so).
pub const SVG_NODE_LIMIT: usize = 3000;

/// The forest drawn as SVG (see the module doc); each node has `class="node"` and
/// `data-function`, a highlighted one also `class="node suspect"`.
pub fn svg(f: &Forest, table: &FuncTable, highlight: &HashSet<String>) -> String {
    let f = if f.nodes.len() > SVG_NODE_LIMIT {
        // Preorder: the first nodes hold their own parents, so a prefix is a forest.
        let mut nodes = f.nodes[..SVG_NODE_LIMIT].to_vec();
        for n in &mut nodes {
            n.children.retain(|ch| (*ch as usize) < SVG_NODE_LIMIT);
        }
        std::borrow::Cow::Owned(Forest { nodes, truncated: true })
    } else {
        std::borrow::Cow::Borrowed(f)
    };
    // An indented tree, one node per row in preorder (x by depth): readable at any size,
    // where a layered drawing of a few hundred leaves would be metres wide.
    let depth = depths(&f);
    let (row, h, indent) = (24.0, 18.0, 22.0);
    let px = |i: usize| 10.0 + depth[i] as f64 * indent;
    let py = |i: usize| 10.0 + i as f64 * row;
    let width = depth.iter().max().map(|d| *d as f64).unwrap_or(0.0) * indent + 7.0 * 44.0 + 120.0;
    let height = f.nodes.len() as f64 * row + 40.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"afct-tree\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"monospace\" font-size=\"11\">\n"
    );
    for (i, n) in f.nodes.iter().enumerate() {
        if let Some(p) = n.parent {
            let p = p as usize;
            let (x0, y0, y1) = (px(p) + 8.0, py(p) + h, py(i) + h / 2.0);
            let _ = writeln!(
                s,
                "<polyline points=\"{x0:.1},{y0:.1} {x0:.1},{y1:.1} {:.1},{y1:.1}\" fill=\"none\" stroke=\"#888\"><title>{} calls</title></polyline>",
                px(i),
                n.calls
            );
        }
    }
    for (i, n) in f.nodes.iter().enumerate() {
        let name = &table.get(n.func).name;
        let suspect = highlight.contains(&**name);
        let (class, stroke, sw) = if suspect { ("node suspect", "crimson", 3) } else { ("node", "#333", 1) };
        let label: String =
            if name.chars().count() > 40 { name.chars().take(39).chain(['…']).collect() } else { name.to_string() };
        let bw = 7.0 * label.chars().count() as f64 + 10.0;
        let color = format!("{:?}", n.color).to_lowercase();
        let _ = writeln!(
            s,
            "<g class=\"{class}\" data-function=\"{}\" data-color=\"{color}\"><title>{} ({color}, {} calls)</title><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{h}\" rx=\"3\" fill=\"{}\" stroke=\"{stroke}\" stroke-width=\"{sw}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#666\">×{}</text></g>",
            escape_xml(name),
            escape_xml(name),
            n.calls,
            px(i),
            py(i),
            fill(n.color),
            px(i) + 5.0,
            py(i) + h / 2.0 + 4.0,
            escape_xml(&label),
            px(i) + bw + 6.0,
            py(i) + h / 2.0 + 4.0,
            n.calls
        );
    }
    if f.truncated {
        let _ = writeln!(s, "<text x=\"10\" y=\"{:.0}\">(truncated)</text>", height - 8.0);
    }
    s.push_str("</svg>\n");
    s
}

/// One thread's AFCT for [`chrome_trace`].
pub struct Track<'a> {
    /// The process.
    pub pid: u32,
    /// The thread.
    pub tid: u32,
    /// Its AFCT.
    pub forest: &'a Forest,
}

/// Chrome trace JSON of a window's AFCTs, one track per thread, over `[start_ns, end_ns)`
/// (see the module doc for what is laid out rather than measured).
pub fn chrome_trace(tracks: &[Track<'_>], table: &FuncTable, start_ns: u64, end_ns: u64) -> String {
    let span_us = end_ns.saturating_sub(start_ns) as f64 / 1000.0;
    let mut events = Vec::new();
    for t in tracks {
        let f = t.forest;
        // A node's width: its calls (at least 1), and at least its children's together.
        let mut weight = vec![0.0f64; f.nodes.len()];
        for i in (0..f.nodes.len()).rev() {
            let kids: f64 = f.nodes[i].children.iter().map(|c| weight[*c as usize]).sum();
            weight[i] = (f.nodes[i].calls.max(1) as f64).max(kids);
        }
        let total: f64 = f.roots().map(|r| weight[r as usize]).sum();
        let scale = if total > 0.0 { span_us / total } else { 0.0 };
        let mut at = vec![0.0f64; f.nodes.len()];
        let mut cursor = start_ns as f64 / 1000.0;
        for r in f.roots() {
            at[r as usize] = cursor;
            cursor += weight[r as usize] * scale;
        }
        for (i, n) in f.nodes.iter().enumerate() {
            let mut child_at = at[i];
            for c in &n.children {
                at[*c as usize] = child_at;
                child_at += weight[*c as usize] * scale;
            }
            let color = format!("{:?}", n.color).to_lowercase();
            events.push(format!(
                "{{\"name\":{},\"cat\":\"{color}\",\"ph\":\"X\",\"ts\":{:.3},\"dur\":{:.3},\"pid\":{},\"tid\":{},\"args\":{{\"calls\":{},\"color\":\"{color}\"}}}}",
                json_string(&table.get(n.func).name),
                at[i],
                weight[i] * scale,
                t.pid,
                t.tid,
                n.calls
            ));
        }
        events.push(format!(
            "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":{},\"tid\":{},\"args\":{{\"name\":\"tid {}\"}}}}",
            t.pid, t.tid, t.tid
        ));
    }
    format!(
        "{{\"displayTimeUnit\":\"ms\",\"otherData\":{{\"note\":\"afetm AFCTs: slices are laid out over the window by call count, not measured (the analyzer keeps call counts per edge, not call times)\"}},\"traceEvents\":[\n{}\n]}}\n",
        events.join(",\n")
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Forest, FuncTable) {
        let mut t = FuncTable::default();
        let (main, a, b, leaf) =
            (t.intern("m", "main"), t.intern("m", "a<\"x\">"), t.intern("m", "b"), t.intern("m", "leaf"));
        let mut f = Forest::default();
        let r = f.push(main, Color::White, None, 1);
        let na = f.push(a, Color::Blue, Some(r), 3);
        f.push(leaf, Color::White, Some(na), 10);
        f.push(b, Color::Red, Some(r), 2);
        (f, t)
    }

    #[test]
    fn dot_has_every_node_and_edge_with_colors_and_the_suspect() {
        let (f, t) = sample();
        let d = dot(&f, &t, &HashSet::from(["leaf".to_string()]));
        assert_eq!(d.matches(" -> ").count(), 3);
        assert!(d.contains("label=\"a<\\\"x\\\">\""), "{d}");
        assert!(d.contains("fillcolor=\"#9ecae1\"") && d.contains("fillcolor=\"#fc9272\""), "{d}");
        assert_eq!(d.matches("crimson").count(), 1, "{d}");
        assert!(d.contains("n1 -> n2 [label=\"10\"]"), "{d}");
    }

    #[test]
    fn svg_is_well_formed_and_marks_the_suspect() {
        let (f, t) = sample();
        let s = svg(&f, &t, &HashSet::from(["b".to_string()]));
        assert_eq!(s.matches("<g class=\"node").count(), 4);
        assert_eq!(s.matches("class=\"node suspect\"").count(), 1);
        assert!(s.contains("data-function=\"a&lt;&quot;x&quot;&gt;\""), "{s}");
        assert_eq!(s.matches("<polyline").count(), 3);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn svg_of_a_huge_tree_draws_its_first_nodes_and_no_dangling_edge() {
        let mut t = FuncTable::default();
        let (root, leaf) = (t.intern("m", "root"), t.intern("m", "leaf"));
        let mut f = Forest::default();
        let r = f.push(root, Color::White, None, 1);
        for _ in 0..SVG_NODE_LIMIT + 500 {
            f.push(leaf, Color::White, Some(r), 1);
        }
        let s = svg(&f, &t, &HashSet::new());
        assert_eq!(s.matches("<g class=\"node").count(), SVG_NODE_LIMIT);
        assert_eq!(s.matches("<polyline").count(), SVG_NODE_LIMIT - 1, "one edge per drawn child");
        assert!(s.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn chrome_trace_nests_children_inside_parents_over_the_window() {
        let (f, t) = sample();
        let json = chrome_trace(&[Track { pid: 7, tid: 8, forest: &f }], &t, 1_000_000, 11_000_000);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let slice = |name: &str| ev.iter().find(|e| e["name"] == name).unwrap().clone();
        let (main, a, leaf, b) = (slice("main"), slice("a<\"x\">"), slice("leaf"), slice("b"));
        let span =
            |e: &serde_json::Value| (e["ts"].as_f64().unwrap(), e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap());
        let inside = |c: (f64, f64), p: (f64, f64)| c.0 >= p.0 - 1e-6 && c.1 <= p.1 + 1e-6;
        assert_eq!(span(&main), (1000.0, 11000.0), "the root fills the window");
        assert!(inside(span(&a), span(&main)) && inside(span(&b), span(&main)) && inside(span(&leaf), span(&a)));
        assert!(span(&a).1 <= span(&b).0 + 1e-6, "siblings do not overlap");
        assert_eq!(leaf["args"]["calls"], 10);
        assert_eq!(a["cat"], "blue");
        assert!(ev.iter().any(|e| e["ph"] == "M" && e["tid"] == 8));
    }
}
