//! The training dataset: one JSON line per tree of a valid run, readable without afetm (a
//! PyTorch user needs only `json`).
//!
//! ```json
//! {"target":"redis","run":12,"role":"train","label":{"function":"zmalloc","kind":"crash","fault":"crash"},
//!  "manifestation":"crash","normal_like":false,"pid":4711,"tid":4711,"start_ns":123,
//!  "nodes":[{"function":"main","module":"redis-server","color":"white","parent":null,"calls":1}, ...]}
//! ```
//! `truncated` says the analyzer's node cap cut the tree. `label` is `"normal"` for trees of normal runs and for trees of fault runs the fault did not
//! reach. `nodes` are in preorder; `calls` is the count of the (parent, node) edge in that
//! thread and window (its own, though the FDDB stores one tree per structure), not of that calling context (afetm folds recursion). With a plan, every
//! tree is the AFCT (Algorithm 3) the analyzer would build from the events an agent running
//! that plan sends (`afct::from_fct`): the plan's functions with their callers, call stacks for
//! its F^callstack. When the plan's F^callstack is complete for the tree this is Algorithm 2's
//! colored FCT with its red nodes masked; when not (F^callstack came from other normal FCTs),
//! it is still exactly what the diagnosis model sees at run time. Runs that dropped events or never
//! applied their fault are not written.

use std::{
    collections::{HashMap, HashSet},
    io::Write,
};

use afetm_calltree::{
    afct,
    graph::CallGraph,
    tree::{Color, Forest, FuncId, FuncTable},
};
use afetm_proto::plan::{Mode, PlanFile};
use rusqlite::params;
use serde::Serialize;

use crate::{Fddb, FddbError, Role, decode_tree};

/// What to write.
#[derive(Clone, Debug, Default)]
pub struct DatasetOptions {
    /// Only runs of this role (both without).
    pub role: Option<Role>,
    /// Color against this plan's trace points and mask red nodes.
    pub plan: Option<PlanFile>,
}

/// What was written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DatasetStats {
    /// Lines (trees).
    pub trees: u64,
    /// Trees labelled with a fault.
    pub faulty: u64,
    /// Of those, equal to a normal tree.
    pub normal_like: u64,
    /// Trees masked to nothing by the plan (not written).
    pub empty: u64,
}

#[derive(Serialize)]
struct Node<'a> {
    function: &'a str,
    module: &'a str,
    color: &'static str,
    parent: Option<u32>,
    calls: u64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Label {
    Normal(&'static str),
    Fault { function: String, kind: String, fault: String },
}

#[derive(Serialize)]
struct Line<'a> {
    target: &'a str,
    run: i64,
    role: String,
    label: Label,
    manifestation: String,
    normal_like: bool,
    pid: u32,
    tid: u32,
    start_ns: u64,
    /// The analyzer's node cap cut the tree.
    truncated: bool,
    nodes: Vec<Node<'a>>,
}

/// The plan's trace points (event or callstack mode) and its F^callstack, as function names,
/// checked against what the campaign traced.
struct Points {
    traced: HashSet<String>,
    callstack: HashSet<String>,
}

fn plan_points(plan: &PlanFile, traced: &HashSet<String>) -> Result<Points, FddbError> {
    let mut points = HashSet::new();
    let mut callstack = HashSet::new();
    for p in plan.points.iter().filter(|p| p.mode != Mode::Count) {
        let names: Vec<String> =
            if p.function == "*" { traced.iter().cloned().collect() } else { vec![p.function.clone()] };
        if p.mode == Mode::Callstack {
            callstack.extend(names.iter().cloned());
        }
        points.extend(names);
    }
    let mut outside: Vec<&String> = points.iter().filter(|f| !traced.contains(*f)).collect();
    if !outside.is_empty() {
        outside.sort();
        let n = outside.len();
        outside.truncate(5);
        return Err(FddbError::Plan(format!(
            "the plan traces {n} function(s) the campaign's full trace did not ({}{}): its FCTs cannot be colored against it",
            outside.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if n > 5 { ", ..." } else { "" }
        )));
    }
    Ok(Points { traced: points, callstack })
}

/// The AFCT an agent running the plan would give the analyzer for this full-trace FCT
/// ([`afct::from_fct`]; Alg. 2's masked colored FCT when F^callstack is complete for it), with
/// the call graph of those events (what the diagnosis model reads).
fn as_afct(forest: &Forest, table: &FuncTable, module: &str, points: &Points) -> (Forest, CallGraph) {
    let ids = |names: &HashSet<String>| -> HashSet<FuncId> {
        (0..)
            .map(FuncId)
            .take_while(|id| (id.0 as usize) < table.len())
            .filter(|id| {
                let f = table.get(*id);
                &*f.module == module && names.contains(&*f.name)
            })
            .collect()
    };
    let data = afct::trace_of_fct(forest, &ids(&points.traced), &ids(&points.callstack));
    (data.build(afct::DEFAULT_NODE_CAP), data.graph())
}

/// One tree of the dataset as [`Fddb::for_each_tree`] hands it out.
#[derive(Debug)]
pub struct TreeRow<'a> {
    /// The run (the unit of any train/validation split).
    pub run: i64,
    /// The run's role (`train` or `eval`).
    pub role: String,
    /// The run's fault as (function, kind, fault text); None for a normal run.
    pub run_fault: Option<(String, String, String)>,
    /// The fault reached this tree's thread (it is labelled with the run's fault).
    pub faulty: bool,
    /// How the run manifested.
    pub manifestation: String,
    /// The full FCT equals a valid normal run's tree.
    pub normal_like: bool,
    /// Process, thread and window start of the tree.
    pub pid: u32,
    /// See `pid`.
    pub tid: u32,
    /// See `pid`.
    pub start_ns: u64,
    /// End of the window (None for trees recorded before FDDB schema 3).
    pub end_ns: Option<u64>,
    /// The tree: the full FCT, or with a plan, the AFCT the plan's agent would give.
    pub forest: &'a Forest,
    /// The window's call graph: the full FCT's, or with a plan, that of the events the plan's
    /// agent would send (`afct::trace_of_fct`), which `forest` unrolls.
    pub graph: &'a CallGraph,
    /// Names of the tree's functions.
    pub table: &'a FuncTable,
}

impl Fddb {
    /// Calls `each` for every tree of a valid run of target `name` (see the module docs), in
    /// run order; trees masked to nothing by the plan are counted in the result, not handed out.
    pub fn for_each_tree(
        &self,
        name: &str,
        opts: &DatasetOptions,
        mut each: impl FnMut(&TreeRow) -> Result<(), FddbError>,
    ) -> Result<DatasetStats, FddbError> {
        let target = self.target_id(name)?.ok_or_else(|| FddbError::Plan(format!("no target {name:?} in the FDDB")))?;
        let module = self.module(target)?;
        let points = match &opts.plan {
            Some(p) => Some(plan_points(p, &self.traced(target)?)?),
            None => None,
        };
        let mut st = self.conn.prepare(
            "SELECT r.id, r.role, r.manifestation, fu.name, fa.kind, fa.spec, rt.fct_id, rt.pid, rt.tid, rt.start_ns,
               rt.faulty, rt.normal_like, rt.end_ns, rt.calls
             FROM run_trees rt JOIN runs r ON r.id = rt.run_id LEFT JOIN faults fa ON fa.id = r.fault_id
             LEFT JOIN functions fu ON fu.id = fa.function_id
             WHERE r.target_id = ?1 AND r.status = 'ok' AND (?2 IS NULL OR r.role = ?2)
             ORDER BY r.id, rt.pid, rt.tid, rt.start_ns",
        )?;
        let mut tree_st = self.conn.prepare("SELECT tree FROM fcts WHERE id = ?1")?;
        // The stored FCT of each structure, and its derived tree and graph for the windows that
        // read its own calls (those recorded before FDDB schema 7).
        let mut cache: HashMap<i64, (Forest, FuncTable)> = HashMap::new();
        let mut derived: HashMap<i64, (Forest, CallGraph)> = HashMap::new();
        let mut stats = DatasetStats::default();
        let mut rows = st.query(params![target, opts.role.map(|r| r.as_str())])?;
        while let Some(r) = rows.next()? {
            let fct: i64 = r.get(6)?;
            if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(fct) {
                let bytes: Vec<u8> = tree_st.query_row([fct], |r| r.get(0))?;
                let mut table = FuncTable::default();
                let forest = Forest::from_proto(&decode_tree(&bytes)?, &mut table).map_err(FddbError::Stored)?;
                slot.insert((forest, table));
            }
            let (stored, table) = &cache[&fct];
            let derive = |f: &Forest| match &points {
                Some(p) => as_afct(f, table, &module, p),
                None => (f.clone(), CallGraph::from_forest(f)),
            };
            let own;
            let (forest, graph) = match r.get::<_, Option<Vec<u8>>>(13)? {
                Some(bytes) => {
                    let run: i64 = r.get(0)?;
                    let mut f = stored.clone();
                    f.set_canonical_calls(table, &crate::decode_calls(&bytes)?)
                        .map_err(|e| FddbError::Stored(format!("run {run}'s window calls: {e}")))?;
                    own = derive(&f);
                    (&own.0, &own.1)
                }
                None => {
                    let d = derived.entry(fct).or_insert_with(|| derive(stored));
                    (&d.0, &d.1)
                }
            };
            if forest.is_empty() {
                stats.empty += 1;
                continue;
            }
            let run_fault = match r.get::<_, Option<String>>(3)? {
                Some(function) => Some((function, r.get(4)?, r.get(5)?)),
                None => None,
            };
            let row = TreeRow {
                run: r.get(0)?,
                role: r.get(1)?,
                run_fault,
                faulty: r.get(10)?,
                manifestation: r.get(2)?,
                normal_like: r.get(11)?,
                pid: r.get(7)?,
                tid: r.get(8)?,
                start_ns: r.get::<_, i64>(9)? as u64,
                end_ns: r.get::<_, Option<i64>>(12)?.map(|e| e as u64),
                forest,
                graph,
                table,
            };
            stats.trees += 1;
            stats.faulty += row.faulty as u64;
            stats.normal_like += row.normal_like as u64;
            each(&row)?;
        }
        Ok(stats)
    }

    /// Writes the dataset of target `name` to `out` (see the module docs).
    pub fn dataset(&self, name: &str, opts: &DatasetOptions, out: &mut impl Write) -> Result<DatasetStats, FddbError> {
        self.for_each_tree(name, opts, |t| {
            let label = match (&t.run_fault, t.faulty) {
                (Some((function, kind, fault)), true) => {
                    Label::Fault { function: function.clone(), kind: kind.clone(), fault: fault.clone() }
                }
                _ => Label::Normal("normal"),
            };
            let line = Line {
                target: name,
                run: t.run,
                role: t.role.clone(),
                label,
                manifestation: t.manifestation.clone(),
                normal_like: t.normal_like,
                pid: t.pid,
                tid: t.tid,
                start_ns: t.start_ns,
                truncated: t.forest.truncated,
                nodes: t
                    .forest
                    .nodes
                    .iter()
                    .map(|n| {
                        let f = t.table.get(n.func);
                        Node {
                            function: &f.name,
                            module: &f.module,
                            color: match n.color {
                                Color::White => "white",
                                Color::Blue => "blue",
                                Color::Red => "red",
                            },
                            parent: n.parent,
                            calls: n.calls,
                        }
                    })
                    .collect(),
            };
            serde_json::to_writer(&mut *out, &line).map_err(|e| FddbError::Io("dataset".into(), e.into()))?;
            out.write_all(b"\n").map_err(|e| FddbError::Io("dataset".into(), e))
        })
    }
}
