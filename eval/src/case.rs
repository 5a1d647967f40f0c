//! What every method is scored on: one run ([`Case`]) with its truth, its windows' trees and
//! its logs, in one of two conditions (sec. "Held-out runs as production sees them" of the
//! evaluation issue):
//! - [`from_fddb`]: the campaign's runs of one role (eval-role for scoring, train-role for
//!   fitting the baselines), each window with its full FCT and the AFCT the plan's agent would
//!   have given (`afct::from_fct`);
//! - [`from_live`]: fresh injections into the running shop, each window with the AFCT the
//!   daemon built and the diagnosis it stored.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    str::FromStr,
};

use afetm_analyzer::store::Store;
use afetm_calltree::graph::NamedGraph;
use afetm_diagnosis::{
    Class,
    fate::{self, ThreadFate},
};
use afetm_fault::{Applied, Fault, FaultKind};
use afetm_fddb::{Fddb, HeldOut, Role, dataset::DatasetOptions};
use afetm_proto::{
    self as pb,
    plan::{Mode, PlanFile},
};
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// The diagnosis the daemon stored for a window (live condition only).
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// P(normal) of the window's worst thread.
    pub p_normal: f32,
    /// Whether it alarmed.
    pub error: bool,
    /// Its top-k, most likely first, as (function, kind).
    pub top: Vec<(String, FaultKind)>,
    /// When it was stored (wall clock).
    pub diagnosed_unix_ms: i64,
    /// From the window's close to the stored diagnosis.
    pub latency_us: u64,
}

/// One thread's tree of one window.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Process.
    pub pid: u32,
    /// Thread.
    pub tid: u32,
    /// Window start, agent clock (ns).
    pub start_ns: u64,
    /// Window end, agent clock (ns), where known (FDDB trees before schema 3 have none; they
    /// count as ending after the injection).
    pub end_ns: Option<u64>,
    /// The full FCT equals a tree of a valid normal run (campaign runs only).
    pub normal_like: bool,
    /// The fault reached this thread in this window (the FDDB's label; live: an application
    /// of the injector in it, every thread for crash and deadlock).
    pub faulty: bool,
    /// The full-trace FCT (campaign runs only).
    pub full: Option<pb::Tree>,
    /// The AFCT under the plan (empty trees are `None`).
    pub afct: Option<pb::Tree>,
    /// The call graph under the plan that `afct` unrolls (FDDB runs: of the events the plan's
    /// agent would send; live: of the events it sent), which the GCN reads; `None` with `afct`.
    pub graph: Option<NamedGraph>,
    /// When the window closed, wall clock (live only): an offline method's report time is this
    /// plus its compute time.
    pub end_unix_ms: Option<i64>,
    /// The daemon's diagnosis when this thread was the window's verdict (live only).
    pub stored: Option<Stored>,
    /// How the thread ended or stopped in this window, if it did, with its last calls as the
    /// plan's agent would have seen them (FDDB runs: the full trace's last calls that the plan
    /// traces). A window may hold a fate and no tree: a thread that made no traced call.
    pub fate: Option<ThreadFate>,
}

/// One run: a fault injection or a normal run.
#[derive(Clone, Debug)]
pub struct Case {
    /// FDDB run id, or the live run's index.
    pub run: i64,
    /// What was injected (or `normal`).
    pub truth: Class,
    /// The fault's text (`crash`, `input:1:3`, ...), empty for a normal run.
    pub fault: String,
    /// How it showed from outside (FDDB runs; live runs: `live`).
    pub manifestation: String,
    /// Its windows, one entry per thread.
    pub windows: Vec<Window>,
    /// (source, text) of the servers' logs during the run.
    pub logs: Vec<(String, String)>,
    /// The injection's first application, wall clock (live only).
    pub injected_unix_ms: Option<i64>,
    /// The root-cause log line, where one exists: the first error-level line whose template
    /// no normal training run logged (`methods::logs::LogIdealized::root_line`). The run's
    /// logs carry no line labels; this is the line an engineer would read first.
    pub root_line: Option<String>,
    /// The injection's first application, agent clock (ns): a window that ended at or before
    /// it is the run's lead, where an alarm is a false alarm, not a detection.
    pub first_applied_ns: Option<u64>,
    /// Why the run's fault had no training runs (None: its spec was trained on, or normal).
    pub held_out: Option<HeldOut>,
    /// Whether the fault showed: the shop answered with errors, slowed, the process crashed or
    /// hung, or a full-trace FCT the fault reached equals no normal tree (None: not known, as
    /// for live runs).
    pub manifested: Option<bool>,
    /// The function top-k is scored against when it is not the injected one: for a function
    /// no training run injected into, the nearest trained function in the normal FCT
    /// ([`crate::metrics::nearest_known`]).
    pub located_as: Option<String>,
}

impl Case {
    /// A case with its truth and nothing else.
    pub fn new(run: i64, truth: Class) -> Case {
        Case {
            run,
            truth,
            fault: String::new(),
            manifestation: String::new(),
            windows: Vec::new(),
            logs: Vec::new(),
            injected_unix_ms: None,
            root_line: None,
            first_applied_ns: None,
            held_out: None,
            manifested: None,
            located_as: None,
        }
    }
}

fn class_of(fault: &Option<(String, String, String)>) -> Result<Class, EvalError> {
    Ok(match fault {
        Some((function, kind, _)) => Class::Fault {
            function: function.clone(),
            kind: FaultKind::from_str(kind).map_err(|_| EvalError::Input(format!("unknown fault kind {kind:?}")))?,
        },
        None => Class::Normal,
    })
}

/// The valid runs of `target` in `role`, with full FCTs and (given a plan) AFCTs under it.
pub fn from_fddb(fddb: &Fddb, target: &str, plan: Option<&PlanFile>, role: Role) -> Result<Vec<Case>, EvalError> {
    let mut cases = Vec::new();
    let mut by_run: HashMap<i64, usize> = HashMap::new();
    for r in fddb.valid_runs(target, role)? {
        by_run.insert(r.id, cases.len());
        let first = fddb.run_applications(r.id)?.iter().map(|a| a.first_ns).min();
        let showed = !matches!(r.manifestation.as_str(), "nothing" | "normal");
        cases.push(Case {
            fault: r.fault.as_ref().map(|f| f.2.clone()).unwrap_or_default(),
            manifestation: r.manifestation,
            logs: fddb.run_logs(r.id)?,
            first_applied_ns: first,
            held_out: r.held_out,
            manifested: r.fault.is_some().then_some(showed),
            ..Case::new(r.id, class_of(&r.fault)?)
        });
    }
    let mut at: HashMap<(i64, u32, u32, u64), (usize, usize)> = HashMap::new();
    let opts = DatasetOptions { role: Some(role), plan: None };
    fddb.for_each_tree(target, &opts, |row| {
        let Some(&c) = by_run.get(&row.run) else { return Ok(()) };
        let w = Window {
            pid: row.pid,
            tid: row.tid,
            start_ns: row.start_ns,
            end_ns: row.end_ns,
            normal_like: row.normal_like,
            faulty: row.faulty,
            full: Some(row.forest.to_proto(row.table)),
            ..Window::default()
        };
        at.insert((row.run, row.pid, row.tid, row.start_ns), (c, cases[c].windows.len()));
        let case = &mut cases[c];
        // A fault that left a full-trace FCT no normal run has is a fault that showed.
        if row.faulty
            && !row.normal_like
            && let Some(m) = case.manifested.as_mut()
        {
            *m = true;
        }
        case.windows.push(w);
        Ok(())
    })?;
    if let Some(plan) = plan {
        let opts = DatasetOptions { role: Some(role), plan: Some(plan.clone()) };
        fddb.for_each_tree(target, &opts, |row| {
            if let Some(&(c, w)) = at.get(&(row.run, row.pid, row.tid, row.start_ns)) {
                cases[c].windows[w].afct = Some(row.forest.to_proto(row.table));
                cases[c].windows[w].graph = Some(NamedGraph::compact(row.graph, row.table));
            }
            Ok(())
        })?;
    }
    let traced: Option<HashSet<&str>> =
        plan.map(|p| p.points.iter().filter(|p| p.mode != Mode::Count).map(|p| p.function.as_str()).collect());
    for c in &mut cases {
        for f in fddb.run_fates(c.run)? {
            // `from_proto` names the calls without their module, as the plan does.
            if let Some(mut fate) = fate::from_proto(&[f.to_proto()]).pop() {
                if let Some(traced) = &traced {
                    fate.last_calls.retain(|call| traced.contains(call.as_str()));
                }
                attach_fate(c, f.pid, f.window_start_ns, f.ts_ns, fate);
            }
        }
    }
    Ok(cases)
}

/// Puts `fate` on its thread's window of the process's window starting at `start_ns`, or on a
/// window of its own when the thread has no tree there (it ends where the process's other
/// windows do, or at the fate; it is faulty when the run's crash or deadlock came before).
fn attach_fate(case: &mut Case, pid: u32, start_ns: u64, ts_ns: u64, fate: ThreadFate) {
    let same = |w: &&mut Window| w.pid == pid && w.start_ns == start_ns;
    if let Some(w) = case.windows.iter_mut().filter(same).find(|w| w.tid == fate.tid) {
        w.fate = Some(fate);
        return;
    }
    let end = case.windows.iter_mut().filter(same).filter_map(|w| w.end_ns).max().unwrap_or(ts_ns).max(ts_ns);
    let ends_process = matches!(case.truth, Class::Fault { kind: FaultKind::Crash | FaultKind::Deadlock, .. });
    let faulty = ends_process && case.first_applied_ns.is_some_and(|a| a <= end);
    case.windows.push(Window {
        pid,
        tid: fate.tid,
        start_ns,
        end_ns: Some(end),
        faulty,
        fate: Some(fate),
        ..Window::default()
    });
}

/// One fresh injection (or normal run) into the running shop, as `cargo xtask eval` records
/// it in `live-runs.jsonl`: which agent traced, when, what was injected, where it applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveRun {
    /// The agent that traced the target with the plan.
    pub agent: String,
    /// Windows starting in `[from_ns, to_ns)` (agent clock) belong to the run.
    pub from_ns: u64,
    /// See `from_ns`.
    pub to_ns: u64,
    /// The function injected, absent for a normal run.
    pub function: Option<String>,
    /// The fault's text.
    pub fault: Option<String>,
    /// What the injector applied, per thread (agent clock).
    pub applications: Vec<Applied>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC at the run, ns.
    pub clock_offset_ns: i64,
    /// The servers' log lines written during the run, (source, text).
    #[serde(default)]
    pub logs: Vec<(String, String)>,
}

impl LiveRun {
    fn truth(&self) -> Result<(Class, Option<FaultKind>), EvalError> {
        match (&self.function, &self.fault) {
            (Some(function), Some(text)) => {
                let kind = Fault::from_str(text).map_err(|e| EvalError::Input(format!("fault {text:?}: {e}")))?.kind();
                Ok((Class::Fault { function: function.clone(), kind }, Some(kind)))
            }
            _ => Ok((Class::Normal, None)),
        }
    }

    fn unix_ms(&self, mono_ns: u64) -> i64 {
        (mono_ns as i64 + self.clock_offset_ns) / 1_000_000
    }
}

/// The live runs in `runs` (JSON lines) with the windows, AFCTs and diagnoses the analyzer
/// stored in `db` (its SQLite database; the daemon may be stopped).
pub fn from_live(db: &Path, runs: &Path, window_ms: u64) -> Result<Vec<Case>, EvalError> {
    let text = std::fs::read_to_string(runs).map_err(|e| EvalError::Input(format!("{}: {e}", runs.display())))?;
    let store = Store::open(db, Default::default(), Default::default())?;
    let mut cases = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let run: LiveRun = serde_json::from_str(line)
            .map_err(|e| EvalError::Input(format!("{}: line {}: {e}", runs.display(), i + 1)))?;
        cases.push(live_case(&store, i as i64, &run, window_ms)?);
    }
    Ok(cases)
}

fn live_case(store: &Store, index: i64, run: &LiveRun, window_ms: u64) -> Result<Case, EvalError> {
    let (truth, kind) = run.truth()?;
    let everywhere = matches!(kind, Some(FaultKind::Crash | FaultKind::Deadlock));
    let first = run.applications.iter().map(|a| a.first_ns).min();
    let req = pb::ListWindowsRequest { agent_id: run.agent.clone(), closed_only: true, ..Default::default() };
    let diag_req = pb::ListDiagnosesRequest {
        agent_id: run.agent.clone(),
        from_ns: run.from_ns,
        to_ns: run.to_ns,
        ..Default::default()
    };
    let stored: HashMap<u64, pb::Diagnosis> =
        store.list_diagnoses(&diag_req)?.into_iter().map(|d| (d.window_id, d)).collect();
    let mut windows = Vec::new();
    for w in store.list_windows(&req)? {
        if w.start_ns < run.from_ns || w.start_ns >= run.to_ns {
            continue;
        }
        let end = w.end_ns.max(w.start_ns + window_ms * 1_000_000);
        let mut fates = fate::from_proto(&w.fates);
        let mut graphs: HashMap<u32, NamedGraph> = store.graphs(w.id as i64)?.into_iter().collect();
        for tid in &w.tids {
            let applied = |a: &Applied| a.overlaps(w.start_ns, end) && (a.tid == *tid || everywhere);
            let faulty = run.applications.iter().any(applied) || (everywhere && first.is_some_and(|f| f <= end));
            let stored = stored.get(&w.id).filter(|d| d.tid == *tid).map(stored_of);
            windows.push(Window {
                pid: w.pid,
                tid: *tid,
                start_ns: w.start_ns,
                end_ns: Some(end),
                normal_like: false,
                faulty,
                full: None,
                afct: store.afct(w.id, *tid)?.filter(|t| !t.nodes.is_empty()),
                graph: graphs.remove(tid).filter(|g| !g.graph.is_empty()),
                end_unix_ms: Some(run.unix_ms(end)),
                stored,
                fate: fates.iter().position(|f| f.tid == *tid).map(|i| fates.swap_remove(i)),
            });
        }
        // Threads that ended or stopped with no traced call in the window.
        for fate in fates {
            let faulty = everywhere && first.is_some_and(|f| f <= end);
            let stored = stored.get(&w.id).filter(|d| d.tid == fate.tid).map(stored_of);
            windows.push(Window {
                pid: w.pid,
                tid: fate.tid,
                start_ns: w.start_ns,
                end_ns: Some(end),
                faulty,
                end_unix_ms: Some(run.unix_ms(end)),
                stored,
                fate: Some(fate),
                ..Window::default()
            });
        }
    }
    Ok(Case {
        fault: run.fault.clone().unwrap_or_default(),
        manifestation: "live".into(),
        windows,
        logs: run.logs.clone(),
        injected_unix_ms: first.map(|f| run.unix_ms(f)),
        first_applied_ns: first,
        ..Case::new(index, truth)
    })
}

fn stored_of(d: &pb::Diagnosis) -> Stored {
    Stored {
        p_normal: d.p_normal,
        error: d.error,
        top: d.top.iter().filter_map(|s| Some((s.function.clone(), FaultKind::from_str(&s.kind).ok()?))).collect(),
        diagnosed_unix_ms: d.diagnosed_unix_ms,
        latency_us: d.latency_us,
    }
}
