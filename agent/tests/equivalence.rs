//! AFETM's equivalence claim (sec. III.B) on a real server and on the data the diagnosis model
//! learns from: two agents trace the same source-built redis-server at once under the shop's
//! CRUD mix, one every function (the campaign's full trace), one a 10% plan from `select`
//! (weights from count mode, F^callstack from coloring normal FCTs). Per thread, the plan
//! agent's AFCT is compared with the full FCT colored against the plan with its red nodes
//! masked, i.e. what `afetm-analyzer fddb dataset --plan` writes.
//!
//! What holds exactly: the white nodes (traced calls) and the caller edges between them. What
//! does not, measured here on redis (and printed): (1) call stacks reach above the frames that
//! were entered before the window (libc -> main -> aeMain), which a full trace in event mode
//! cannot know, so paths are compared from the masked FCT's roots; (2) a traced function
//! reached through an untraced one on a path the normal FCTs never showed has no call stack, so
//! its untraced caller becomes a root of the AFCT instead of hanging under its own callers (the
//! paper's F^callstack is only as good as the normal FCTs it is computed from). The test
//! requires 80% of the masked FCTs' paths in the AFCTs (87% measured: 178 of 205, the rest all
//! of kind 2: dictGenericDelete, dictExpandAllowed, beforeSleep, connSocketClose).
//!
//! The same run checks the diagnosis model's input (issue 23): the call graph the FDDB's
//! dataset derives from the full FCT under the plan (`afct::trace_of_fct`) against the graph of
//! the plan agent's events (the store's, as the daemon diagnoses them). Every edge into a traced
//! function is equal with its calls (117 measured); of the call-stack edges the derivation
//! gives, 42 of 48 were in the agent's graph (the 6 others on the same paths as kind 2 above),
//! and the test requires 70%.
//!
//! Windows are aligned by cutting both agents' windows of the redis process at one instant
//! (`Control.Cut`) and using one window longer than the run: each thread then has one tree per
//! agent, from the cut to the process's exit. Root only; needs the source builds.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use afetm_calltree::{
    coloring,
    tree::{Color, Forest, FuncTable},
};
use afetm_proto::{self as pb, plan::PlanFile};
use common::*;
use testbed::{Config, Tier};

fn load_report(cfg: &Config, secs: u64) -> testbed::load::Report {
    let mut l = testbed::load::LoadConfig::new(cfg.url());
    l.connections = 4;
    l.duration = Duration::from_secs(secs);
    l.warmup = Duration::ZERO;
    l.rate = Some(100.0);
    l.items = cfg.seed_items;
    testbed::load::run(&l).expect("load")
}

fn load(cfg: &Config, secs: u64) {
    let r = load_report(cfg, secs);
    assert_eq!(r.errors, 0, "{}", r.text());
}

/// The shop's first requests after start-up can stall for seconds (CI saw a 2.7 s p99 and 28
/// timed-out requests in the first traced load, right after another shop test): warm it up,
/// untraced, before the loads whose trees are compared. Failures here are printed, not fatal.
fn warm_up(cfg: &Config) {
    let r = load_report(cfg, 2);
    if r.errors > 0 {
        eprintln!("warm-up: {}", r.text());
    }
}

/// Functions of the white nodes.
fn white(f: &Forest, t: &FuncTable) -> BTreeSet<String> {
    f.nodes.iter().filter(|n| n.color == Color::White).map(|n| t.get(n.func).to_string()).collect()
}

/// (parent, child) of the edges between two white nodes: caller attributes of traced calls.
fn white_edges(f: &Forest, t: &FuncTable) -> BTreeSet<(String, String)> {
    f.nodes
        .iter()
        .filter(|n| n.color == Color::White)
        .filter_map(|n| {
            let p = &f.nodes[n.parent? as usize];
            (p.color == Color::White).then(|| (t.get(p.func).to_string(), t.get(n.func).to_string()))
        })
        .collect()
}

/// Functions at the roots.
fn roots(f: &Forest, t: &FuncTable) -> BTreeSet<String> {
    f.roots().map(|r| t.get(f.nodes[r as usize].func).to_string()).collect()
}

/// Every root-to-node path as `a>b>c [color]`; with `reroot`, a path starts at its last node
/// whose function is one of those (stack frames above where a full trace's window begins).
fn paths(f: &Forest, t: &FuncTable, reroot: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, n) in f.nodes.iter().enumerate() {
        let mut chain = vec![i];
        let mut cur = n.parent;
        while let Some(p) = cur {
            chain.push(p as usize);
            cur = f.nodes[p as usize].parent;
        }
        chain.reverse();
        if let Some(k) = chain.iter().rposition(|j| reroot.contains(&t.get(f.nodes[*j].func).to_string())) {
            chain.drain(..k);
        }
        let names: Vec<String> = chain.iter().map(|j| t.get(f.nodes[*j].func).name.to_string()).collect();
        out.insert(format!("{} [{:?}]", names.join(">"), n.color));
    }
    out
}

fn redis_pid(cfg: &Config) -> u32 {
    testbed::servers(cfg).unwrap().iter().find(|s| s.name == "redis").expect("redis runs").pid
}

/// Per thread: the AFCTs of `agent`'s closed windows of `pid` that start at `at`.
fn trees(url: &str, agent: &str, pid: u32, at: u64) -> (FuncTable, BTreeMap<u32, Forest>) {
    let (table, all) = rt().block_on(afcts(url, agent));
    let mut out = BTreeMap::new();
    for (w, tid, f) in all {
        if w.pid == pid && w.start_ns == at {
            assert!(out.insert(tid, f).is_none(), "one window per thread");
        }
    }
    (table, out)
}

/// Starts every agent's windows of `pid` anew at one instant (`Control.Cut`), so their trees
/// cover the same calls, once every agent has connected.
fn cut_at_once(url: &str, agents: &[&str], pid: u32) -> u64 {
    // An agent is ready once its probes are attached; it may connect to the analyzer a moment
    // later (a loaded machine): wait until every one has.
    let t = std::time::Instant::now();
    while agents.iter().any(|a| rt().block_on(agent_info(url, a)).is_none()) {
        assert!(t.elapsed() < Duration::from_secs(20), "an agent of {agents:?} never connected");
        std::thread::sleep(Duration::from_millis(50));
    }
    let at = afetm_agent::reader::monotonic_ns();
    rt().block_on(async {
        let mut c = control(url).await;
        for agent in agents {
            c.cut(pb::CutRequest { agent_id: agent.to_string(), pids: vec![pid], at_ns: at }).await.expect("cut");
        }
    });
    at
}

/// Waits until every window of `pid` of every agent in `agents` is closed (at most 10 s).
fn wait_closed(url: &str, agents: &[&str], pid: u32) {
    let t = std::time::Instant::now();
    while agents.iter().any(|a| rt().block_on(windows(url, a, false)).iter().any(|w| w.pid == pid && !w.closed)) {
        assert!(t.elapsed() < Duration::from_secs(10), "windows of pid {pid} never closed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops redis (its exit closes the windows), waits until every agent's windows of `pid` are
/// closed, and requires that no agent lost an event.
fn stop_redis_and_close(cfg: &Config, url: &str, agents: &[&str], pid: u32) {
    testbed::stop_tier(cfg, Tier::Redis).unwrap();
    wait_closed(url, agents, pid);
    for agent in agents {
        let info = rt().block_on(agent_info(url, agent)).expect("agent known");
        assert_eq!((info.kernel_drops, info.queue_drops), (0, 0), "{agent} lost events");
    }
}

#[test]
fn afcts_of_a_selected_plan_equal_masked_full_fcts_on_redis() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("run"));
    cfg.base_port = 25580;
    cfg.binaries = testbed::build::binaries(&testbed::build::cache_dir())
        .expect("source builds missing: run `cargo xtask testbed build`");
    cfg.apaches = 1;
    cfg.children = 4;
    cfg.seed_items = 50;
    let _stack = Stack(cfg.clone());
    testbed::up(&cfg).unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    warm_up(&cfg);
    let db = dir.path().join("db.sqlite");
    let an = AnalyzerProc::start(&db, free_port(), &["--window", "60s", "--grace", "0s"]);
    let redis = cfg.binaries.redis.clone();
    let module = afetm_elf::symbols::Module::load(&redis).unwrap().name.to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(analyzer_bin()).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "afetm-analyzer {args:?}: {text}");
    };

    // Weights (count mode), then normal FCTs from the full trace, then the 10% plan.
    let count =
        AgentProc::start(&write_plan(dir.path(), "count", &redis, &[("*", "count")]), &an.url, "count", dir.path());
    load(&cfg, 3);
    count.stop();
    let weights = dir.path().join("w.json");
    let wp = weights.to_str().unwrap();
    cli(&["weights", "--server", &an.url, "--agent", "count", "--module", &module, "--period", "3s", "--out", wp]);
    let full =
        AgentProc::start(&write_plan(dir.path(), "full", &redis, &[("*", "event")]), &an.url, "full", dir.path());
    load(&cfg, 3);
    // Its exit closes the normal windows; select reads them, so wait until they are closed
    // (the agent reports the exit on its next poll, the analyzer then builds the AFCTs).
    let normal_pid = redis_pid(&cfg);
    testbed::stop_tier(&cfg, Tier::Redis).unwrap();
    wait_closed(&an.url, &["full"], normal_pid);
    testbed::start_tier(&cfg, Tier::Redis, None).unwrap();
    let plan = dir.path().join("plan.json");
    let (dbp, pp, rp) = (db.to_str().unwrap(), plan.to_str().unwrap(), redis.to_str().unwrap());
    cli(&[
        "select",
        "--elf",
        rp,
        "--weights",
        wp,
        "--budget",
        "10%",
        "--db",
        dbp,
        "--normal-agent",
        "full",
        "--out",
        pp,
    ]);
    let plan_file = PlanFile::parse(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let selected = plan_file.selection.clone().expect("selection summary");
    assert!(!selected.callstack.is_empty(), "F^callstack from the normal FCTs: {selected:?}");

    // Both agents on the same process; windows cut at one instant.
    let planned = AgentProc::start(&plan, &an.url, "plan", dir.path());
    let pid = redis_pid(&cfg);
    let at = cut_at_once(&an.url, &["full", "plan"], pid);
    load(&cfg, 3);
    stop_redis_and_close(&cfg, &an.url, &["full", "plan"], pid);
    full.stop();
    planned.stop();

    // Per thread: plan AFCT == full FCT colored against the plan, red masked.
    let (ft, full_trees) = trees(&an.url, "full", pid, at);
    let (pt, plan_trees) = trees(&an.url, "plan", pid, at);
    let points: std::collections::HashSet<&str> = plan_file
        .points
        .iter()
        .filter(|p| p.mode != afetm_proto::plan::Mode::Count)
        .map(|p| p.function.as_str())
        .collect();
    let traced = (0..ft.len() as u32)
        .map(afetm_calltree::tree::FuncId)
        .filter(|id| *ft.get(*id).module == *module && points.contains(&*ft.get(*id).name))
        .collect();
    let mut compared = 0;
    let (mut shared, mut only_fct, mut only_afct) = (0usize, Vec::new(), Vec::new());
    for (tid, fct) in &full_trees {
        let masked = coloring::mask_red(&coloring::color(std::slice::from_ref(fct), &traced).fcts[0]);
        let Some(afct) = plan_trees.get(tid) else {
            assert!(
                masked.is_empty(),
                "thread {tid}: the plan agent saw nothing, the masked FCT has {} nodes",
                masked.len()
            );
            continue;
        };
        // Exact: both agents saw the same traced calls (white nodes) and the same caller
        // edges between traced functions.
        assert_eq!(white(afct, &pt), white(&masked, &ft), "thread {tid}: traced functions");
        assert_eq!(white_edges(afct, &pt), white_edges(&masked, &ft), "thread {tid}: traced caller edges");
        // Measured: root-to-node paths, the AFCT re-rooted at the masked FCT's roots.
        let (a, m) = (paths(afct, &pt, &roots(&masked, &ft)), paths(&masked, &ft, &Default::default()));
        shared += a.intersection(&m).count();
        only_fct.extend(m.difference(&a).cloned());
        only_afct.extend(a.difference(&m).cloned());
        compared += 1;
        if *tid == pid {
            assert!(masked.len() >= 10 && fct.len() > masked.len(), "main thread: {} of {}", masked.len(), fct.len());
        }
    }
    assert!(plan_trees.keys().all(|t| full_trees.contains_key(t)), "the full trace saw every thread");
    assert!(compared >= 1 && plan_trees.contains_key(&pid), "compared {compared} threads");
    let total = shared + only_fct.len();
    eprintln!(
        "paths: {shared} shared, {} only in the masked FCTs, {} only in the AFCTs\nonly in the masked FCTs: {only_fct:#?}\nonly in the AFCTs: {only_afct:#?}",
        only_fct.len(),
        only_afct.len()
    );
    // The differences left are paths through an untraced function whose traced callee had no
    // call stack because the normal FCTs behind F^callstack never showed that path (see the
    // module doc); they stay a small share (87% shared in the runs measured here).
    assert!(shared * 10 >= total * 8, "{shared} of {total} paths of the masked FCTs in the AFCTs");
    eprintln!(
        "equivalence on redis: {compared} threads, main thread FCT {} nodes, {shared} of {total} paths",
        full_trees[&pid].len()
    );
    graphs_equal(&db, &an.url, pid, at, &plan_file, &module, (&ft, &full_trees));
}

/// The model's input on both sides (issue 23): the call graph the FDDB's dataset derives from a
/// full-trace FCT under the plan (`afct::trace_of_fct`) against the graph of the events the
/// plan's agent sent (the store's edges of its window, as the daemon diagnoses them). Exact:
/// every traced function, and every edge into one with its calls. The blue edges (call-stack
/// frames) differ only above the frames entered before the window, which the full trace never
/// saw (the module doc's (1)): every blue edge of the derived graph is in the agent's.
fn graphs_equal(
    db: &std::path::Path,
    url: &str,
    pid: u32,
    at: u64,
    plan: &PlanFile,
    module: &str,
    (ft, full_trees): (&FuncTable, &BTreeMap<u32, Forest>),
) {
    use afetm_calltree::{afct, graph::NamedGraph};
    let ids = |mode: Option<afetm_proto::plan::Mode>| -> std::collections::HashSet<afetm_calltree::tree::FuncId> {
        let names: std::collections::HashSet<&str> = plan
            .points
            .iter()
            .filter(|p| p.mode != afetm_proto::plan::Mode::Count && mode.is_none_or(|m| p.mode == m))
            .map(|p| p.function.as_str())
            .collect();
        (0..ft.len() as u32)
            .map(afetm_calltree::tree::FuncId)
            .filter(|id| *ft.get(*id).module == *module && names.contains(&*ft.get(*id).name))
            .collect()
    };
    let (traced, callstack) = (ids(None), ids(Some(afetm_proto::plan::Mode::Callstack)));
    let window = rt()
        .block_on(windows(url, "plan", true))
        .into_iter()
        .find(|w| w.pid == pid && w.start_ns == at)
        .expect("the plan agent's window");
    let store = afetm_store::Store::open(db, Default::default(), Default::default()).expect("open the store");
    let served: BTreeMap<u32, NamedGraph> = store.graphs(window.id as i64).expect("graphs").into_iter().collect();
    let named = |g: &NamedGraph, white: bool| -> BTreeMap<(String, String), u64> {
        g.graph
            .edges
            .iter()
            .filter(|((_, f), _)| (g.graph.nodes.get(f) == Some(&Color::White)) == white)
            .map(|((c, f), n)| ((g.func(*c).name.to_string(), g.func(*f).name.to_string()), *n))
            .collect()
    };
    let (mut traced_edges, mut blue_shared, mut blue_only_served) = (0, 0, 0);
    let mut blue_only_derived = Vec::new();
    for (tid, fct) in full_trees {
        let derived = NamedGraph::compact(&afct::trace_of_fct(fct, &traced, &callstack).graph(), ft);
        let Some(got) = served.get(tid) else {
            assert!(
                derived.graph.edges.is_empty(),
                "thread {tid}: the plan agent sent nothing, the derived graph has edges"
            );
            continue;
        };
        // The FCT is a tree: an edge into a function already on the path (recursion, a
        // cycle's back edge) is not in it, so the derived graph lacks what the agent saw there.
        let (dw, mut gw) = (named(&derived, true), named(got, true));
        gw.retain(|(c, f), _| dw.contains_key(&(c.clone(), f.clone())) || !closes_cycle(fct, ft, c, f));
        assert_eq!(gw, dw, "thread {tid}: traced edges and their calls");
        let (d, g) = (named(&derived, false), named(got, false));
        let missing: Vec<_> = d.keys().filter(|e| !g.contains_key(*e)).cloned().collect();
        traced_edges += dw.len();
        blue_shared += d.len() - missing.len();
        blue_only_served += g.keys().filter(|e| !d.contains_key(*e)).count();
        blue_only_derived.extend(missing);
    }
    assert!(traced_edges >= 10, "graphs too small to mean anything: {traced_edges} traced edges");
    let blue = blue_shared + blue_only_derived.len();
    eprintln!(
        "graphs on redis: {traced_edges} traced edges equal with their calls; call-stack edges: {blue_shared} shared, {} only derived from the FCT {blue_only_derived:?}, {blue_only_served} only the agent's",
        blue_only_derived.len()
    );
    // Call stacks are what the unwinder gives, the FCT's path what the full trace entered: a
    // tail call or a `.part` clone makes them differ in a few frames (measured: see the doc).
    assert!(blue_shared * 10 >= blue * 7, "{blue_shared} of {blue} derived call-stack edges in the agent's graph");
    fn closes_cycle(fct: &Forest, t: &FuncTable, caller: &str, callee: &str) -> bool {
        fct.nodes.iter().filter(|n| &*t.get(n.func).name == caller).any(|n| {
            let mut up = Some(n);
            while let Some(x) = up {
                if &*t.get(x.func).name == callee {
                    return true;
                }
                up = x.parent.map(|p| &fct.nodes[p as usize]);
            }
            false
        })
    }
}

/// Call stacks unwound in the kernel (learnt `.eh_frame` steps) give the same AFCTs as stack
/// copies unwound by the agent, on Debian's stripped redis-server under the shop's mix: two
/// agents with the same plan (hot request-path functions in callstack mode), one with
/// `--kernel-unwind false`, windows cut at one instant. Root only; stock binaries.
#[test]
fn kernel_unwinding_matches_stack_copies_on_redis_under_load() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path().join("run"));
    cfg.base_port = 28480;
    cfg.apaches = 1;
    cfg.children = 4;
    cfg.seed_items = 50;
    let _stack = Stack(cfg.clone());
    testbed::up(&cfg).unwrap_or_else(|e| panic!("testbed up: {e:#}"));
    warm_up(&cfg);
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "3600s", "--grace", "0s"]);
    let redis = cfg.binaries.redis.clone();
    let mut points: Vec<(&str, &str)> =
        ["lookupKey", "createStringObject", "sdsnewlen", "dictFind", "addReply", "zmalloc"]
            .iter()
            .map(|f| (*f, "callstack"))
            .collect();
    points.extend([("call", "event"), ("processCommand", "event")]);
    let plan = write_plan(dir.path(), "stacks", &redis, &points);
    let kernel = AgentProc::start(&plan, &an.url, "kernel", dir.path());
    let copies = AgentProc::start_with(&plan, &an.url, "copies", dir.path(), &["--kernel-unwind", "false"]);
    let pid = redis_pid(&cfg);
    let at = cut_at_once(&an.url, &["kernel", "copies"], pid);
    let mut l = testbed::load::LoadConfig::new(cfg.url());
    l.connections = 8;
    l.duration = Duration::from_secs(4);
    l.warmup = Duration::ZERO;
    l.items = cfg.seed_items;
    // The reference agent copies 8 KiB per call stack: unthrottled, its (debug-build) reader
    // falls behind and the kernel drops, and with a loss the trees could not be compared.
    l.rate = Some(300.0);
    let report = testbed::load::run(&l).expect("load");
    stop_redis_and_close(&cfg, &an.url, &["kernel", "copies"], pid);
    let (klog, clog) = (kernel.stop(), copies.stop());
    let (kt, kf) = trees(&an.url, "kernel", pid, at);
    let (ct, cf) = trees(&an.url, "copies", pid, at);
    assert!(kf.contains_key(&pid), "the main thread was traced");
    assert_eq!(kf.keys().collect::<Vec<_>>(), cf.keys().collect::<Vec<_>>(), "threads");
    let mut nodes = 0;
    for (tid, k) in &kf {
        assert_eq!(k.canonical(&kt), cf[tid].canonical(&ct), "thread {tid}: AFCTs differ");
        nodes += k.len();
    }
    let (stacks, unwound) = (reader_counter(&klog, "stack_events"), reader_counter(&klog, "kernel_unwound"));
    assert_eq!(reader_counter(&clog, "kernel_unwound"), 0);
    eprintln!(
        "redis under load ({:.0} req/s): {} threads, {nodes} AFCT nodes identical; {unwound} of {stacks} call stacks unwound in the kernel",
        report.throughput_rps,
        kf.len()
    );
    assert!(nodes >= 20, "trees too small to mean anything: {nodes} nodes");
    assert!(unwound * 100 >= stacks * 95, "only {unwound} of {stacks} call stacks unwound in the kernel");
}
