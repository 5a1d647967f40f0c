//! End to end: the real agent traces the real `calltree` program with uprobes and the real
//! analyzer builds, stores and serves the trees. Root only (skipped with a message otherwise).
mod common;

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_calltree::{
    coloring::{compare_threads, mask_red},
    tree::{Color, Forest, FuncTable},
};
use afetm_proto::{self as pb, plan::PlanFile};
use common::*;

/// The trace point set the equivalence tests use: entry points, the leaf, and the two functions
/// reached through a function pointer. chain1..3, fib, dispatch, run_main and worker_round are
/// untraced and must come back (blue) from call stacks.
const TRACED: &[&str] = &["main", "worker", "leaf", "op_add", "op_mul"];

fn equivalence(frame_pointers: bool) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), frame_pointers);
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "60s"]);

    // 1. Full trace: every function of the program.
    let full = write_plan(dir.path(), "full", &prog, &[("*", "event")]);
    let agent = AgentProc::start(&full, &an.url, "full", dir.path());
    run_prog(&prog, 20, 0.3);
    agent.stop();
    let (table, fcts) = rt().block_on(afcts(&an.url, "full"));
    assert_eq!(fcts.len(), 2, "one FCT per thread: {fcts:?}");
    let pid = fcts[0].0.pid;
    let main_fct = &fcts.iter().find(|(_, tid, _)| *tid == pid).expect("main thread").2;
    let worker_fct = &fcts.iter().find(|(_, tid, _)| *tid != pid).expect("worker thread").2;
    // The known call tree of calltree.c.
    for path in [
        &["main", "run_main", "chain2", "chain3", "leaf"][..],
        &["main", "run_main", "dispatch", "op_add", "leaf"],
        &["main", "run_main", "fib", "leaf"],
    ] {
        assert!(has_path(main_fct, &table, path), "main thread lacks {path:?}:\n{}", main_fct.render(&table));
    }
    for path in [
        &["worker", "worker_round", "chain1", "chain2", "chain3", "leaf"][..],
        &["worker", "worker_round", "dispatch", "op_mul", "chain3", "leaf"],
    ] {
        assert!(has_path(worker_fct, &table, path), "worker thread lacks {path:?}:\n{}", worker_fct.render(&table));
    }
    assert!(!has_path(main_fct, &table, &["fib", "fib"]), "recursion must be cut (Alg. 3 not_pred)");
    let root_module =
        |f: &Forest| f.roots().map(|r| table.get(f.nodes[r as usize].func).module.to_string()).collect::<Vec<_>>();
    assert!(
        root_module(main_fct).iter().any(|m| m.starts_with("libc")),
        "main is called from libc: {:?}",
        root_module(main_fct)
    );

    // 2. Coloring (Alg. 2) through the analyzer's control service.
    let refs: Vec<pb::FctRef> = fcts.iter().map(|(w, tid, _)| pb::FctRef { window_id: w.id, tid: *tid }).collect();
    let colored = rt().block_on(async {
        control(&an.url)
            .await
            .color(pb::ColorRequest { fcts: refs, traced: TRACED.iter().map(|s| s.to_string()).collect() })
            .await
            .expect("color")
            .into_inner()
    });
    assert!(
        colored.callstack.contains(&"leaf".to_string()),
        "leaf sits under untraced chains and must record stacks: {:?}",
        colored.callstack
    );
    let mut plan = colored.plan.clone().expect("plan");
    plan.target_path = prog.display().to_string();
    let plan = PlanFile::from_proto(&plan).expect("valid plan");
    let adaptive = dir.path().join("adaptive.json");
    std::fs::write(&adaptive, serde_json::to_string(&plan).unwrap()).unwrap();

    // 3. Adaptive trace: only F, with F^callstack recording stacks.
    let agent = AgentProc::start(&adaptive, &an.url, "adaptive", dir.path());
    run_prog(&prog, 20, 0.3);
    let log = agent.stop();
    assert!(log.contains("unwinder_disagreed=0"), "the unwinder must agree with the return address: {log}");
    let (mut table2, trees) = rt().block_on(afcts(&an.url, "adaptive"));
    let masked: Vec<Forest> =
        colored.colored.iter().map(|t| mask_red(&Forest::from_proto(t, &mut table2).unwrap())).collect();
    let afcts: Vec<Forest> = trees.into_iter().map(|(_, _, f)| f).collect();
    let problems = compare_threads(&masked, &afcts, &table2);
    assert!(
        problems.is_empty(),
        "AFCTs differ from the masked colored FCTs: {problems:#?}\nAFCTs:\n{}\nmasked FCTs:\n{}",
        afcts.iter().map(|f| f.render(&table2)).collect::<String>(),
        masked.iter().map(|f| f.render(&table2)).collect::<String>()
    );
    // The untraced chain really was rebuilt from stacks, as blue nodes.
    let blue: Vec<String> = afcts
        .iter()
        .flat_map(|f| f.nodes.iter().filter(|n| n.color == Color::Blue).map(|n| table2.get(n.func).name.to_string()))
        .collect();
    for f in ["run_main", "chain1", "chain2", "chain3", "fib", "dispatch", "worker_round"] {
        assert!(blue.iter().any(|b| b == f), "{f} should be a blue node, blue = {blue:?}");
    }
}

#[test]
fn afct_equals_masked_colored_fct_with_frame_pointers() {
    require_root!();
    equivalence(true);
}

#[test]
fn afct_equals_masked_colored_fct_without_frame_pointers() {
    require_root!();
    equivalence(false);
}

/// Call stacks unwound in the kernel from learnt `.eh_frame` steps give the same AFCTs as the
/// stack copies unwound by the agent: two agents trace the same run of the calltree program,
/// every function in callstack mode, one with `--kernel-unwind false`.
fn kernel_unwinding_matches_stack_copies(frame_pointers: bool) {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), frame_pointers);
    // One window longer than the run: each thread has one tree per agent.
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "3600s", "--grace", "0s"]);
    let plan = write_plan(dir.path(), "stacks", &prog, &[("*", "callstack")]);
    let kernel = AgentProc::start(&plan, &an.url, "kernel", dir.path());
    let copies = AgentProc::start_with(&plan, &an.url, "copies", dir.path(), &["--kernel-unwind", "false"]);
    run_prog(&prog, 20, 0.5);
    let (klog, clog) = (kernel.stop(), copies.stop());
    let (k, c) = (canonical_trees(&an.url, "kernel"), canonical_trees(&an.url, "copies"));
    assert!(!k.is_empty() && k.len() == c.len(), "threads: kernel {} copies {}", k.len(), c.len());
    for ((key, kt), (ckey, ct)) in k.iter().zip(&c) {
        assert_eq!(key, ckey);
        assert_eq!(kt, ct, "thread {key:?}: AFCTs differ");
        assert!(kt.iter().map(Vec::len).sum::<usize>() >= 8, "thread {key:?}: trees too small to mean anything");
    }
    let (stacks, unwound) = (reader_counter(&klog, "stack_events"), reader_counter(&klog, "kernel_unwound"));
    assert_eq!(reader_counter(&clog, "kernel_unwound"), 0, "--kernel-unwind false still unwound in the kernel");
    eprintln!("frame pointers {frame_pointers}: {unwound} of {stacks} call stacks unwound in the kernel");
    // The misses are the stack copies sent before the reader had learnt the steps (it loads
    // the modules first: tens of ms in a debug build, while the program runs flat out); 85-88%
    // were unwound in the kernel here. Half is the floor that still shows the kernel path ran.
    assert!(unwound * 2 >= stacks, "only {unwound} of {stacks} call stacks unwound in the kernel");
}

#[test]
fn kernel_unwinding_matches_stack_copies_with_frame_pointers() {
    require_root!();
    kernel_unwinding_matches_stack_copies(true);
}

#[test]
fn kernel_unwinding_matches_stack_copies_without_frame_pointers() {
    require_root!();
    kernel_unwinding_matches_stack_copies(false);
}

/// Overload control on real probes: a ring buffer far too small for the call rate (test knobs:
/// 64 KiB, drained every 200 ms) overflows under the calltree program with every function in
/// callstack mode. The agent demotes the hottest functions until the drops stop, lists them in
/// its plan report, and restores them once the program is done.
#[test]
fn overload_demotes_hot_functions_until_drops_stop_then_restores_them() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), false);
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "1s"]);
    let plan = write_plan(dir.path(), "all", &prog, &[("*", "callstack")]);
    let knobs = ["--ring-kib", "64", "--poll", "200ms", "--overload-calm", "1s"];
    let agent = AgentProc::start_with(&plan, &an.url, "overload", dir.path(), &knobs);
    let run = {
        let prog = prog.clone();
        std::thread::spawn(move || run_prog(&prog, 400, 4.0))
    };
    let (mut demoted_seen, mut drops) = (Vec::new(), Vec::new());
    let t = Instant::now();
    while !run.is_finished() {
        if let Some(info) = rt().block_on(agent_info(&an.url, "overload")) {
            drops.push((t.elapsed().as_secs_f64(), info.kernel_drops));
            if let Some(r) = info.last_plan.filter(|r| !r.demoted.is_empty()) {
                demoted_seen = r.demoted;
            }
        }
        sleep(Duration::from_millis(100));
    }
    run.join().unwrap();
    sleep(Duration::from_secs(3)); // calm: the modes come back
    let log = agent.stop();
    let (demotions, restorations) = (reader_counter(&log, "demotions"), reader_counter(&log, "restorations"));
    eprintln!(
        "demotions {demotions}, restorations {restorations}, drops over time {drops:?}, demoted {demoted_seen:?}"
    );
    assert!(demotions > 0, "the overflow demoted nothing: {log}");
    assert!(!demoted_seen.is_empty(), "the plan report never listed a demotion");
    for d in &demoted_seen {
        assert_eq!(d.planned, pb::TraceMode::Callstack as i32, "{d:?}");
        assert!(d.now == pb::TraceMode::Event as i32 || d.now == pb::TraceMode::Count as i32, "{d:?}");
    }
    assert!(restorations > 0, "nothing was restored after the load: {log}");
    // The drops of the second half of the run are a small part of the first half's.
    let total = drops.last().map_or(0, |d| d.1);
    let half = drops.iter().rfind(|d| d.0 <= t.elapsed().as_secs_f64() / 2.0).map_or(0, |d| d.1);
    assert!(total > 0, "the small ring never overflowed: the test proves nothing");
    assert!((total - half) * 4 <= half.max(1), "drops went on: {half} in the first half, {} after", total - half);
}

/// Kill -9 the analyzer mid-run and start it again on the same database: every window it had
/// stored is still there, unchanged, and the agent's queue fills the outage (no window missing).
#[test]
fn analyzer_restart_loses_nothing_acknowledged() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), false);
    let db = dir.path().join("db.sqlite");
    let port = free_port();
    let args = ["--window", "400ms", "--grace", "200ms"];
    let an = AnalyzerProc::start(&db, port, &args);
    let plan = write_plan(dir.path(), "p", &prog, &[("leaf", "event"), ("op_add", "callstack")]);
    let agent = AgentProc::start(&plan, &an.url, "restart", dir.path());
    let run = {
        let prog = prog.clone();
        std::thread::spawn(move || run_prog(&prog, 5, 4.0))
    };
    let url = an.url.clone();
    let mut before = Vec::new();
    for _ in 0..100 {
        before = rt()
            .block_on(afcts(&url, "restart"))
            .1
            .into_iter()
            .map(|(w, tid, f)| (w.start_ns, tid, w.events, f))
            .collect::<Vec<_>>();
        if before.iter().map(|b| b.0).collect::<std::collections::HashSet<_>>().len() >= 2 {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    assert!(before.len() >= 2, "no windows closed before the restart");
    let (table_before, _) = rt().block_on(afcts(&url, "restart"));
    an.kill9();
    sleep(Duration::from_millis(800)); // the agent keeps tracing and queueing meanwhile
    let an = AnalyzerProc::start(&db, port, &args);
    run.join().unwrap();
    agent.stop();
    let (table, after) = rt().block_on(afcts(&an.url, "restart"));
    for (start, tid, events, tree) in &before {
        let same = after
            .iter()
            .find(|(w, t, _)| w.start_ns == *start && t == tid)
            .unwrap_or_else(|| panic!("window at {start} tid {tid} vanished"));
        assert_eq!(same.0.events, *events, "window at {start} changed its event count");
        assert_eq!(same.2.canonical(&table), tree.canonical(&table_before), "window at {start} changed its AFCT");
    }
    let mut starts: Vec<u64> = after.iter().map(|(w, _, _)| w.start_ns).collect();
    starts.sort_unstable();
    starts.dedup();
    assert!(starts.len() >= before.len() + 3, "tracing went on after the restart: {} windows", starts.len());
    for pair in starts.windows(2) {
        assert_eq!(pair[1] - pair[0], 400_000_000, "a window is missing: the outage lost data");
    }
    let info = rt().block_on(agent_info(&an.url, "restart")).expect("agent known");
    assert_eq!((info.queue_drops, info.kernel_drops), (0, 0));
}

/// Plans pushed by the analyzer change what is traced without restarting the target; functions
/// that stay keep their probes.
#[test]
fn plan_changes_at_runtime_attach_and_detach_the_difference() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), true);
    let an =
        AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &["--window", "200ms", "--grace", "100ms"]);
    let plan_a = write_plan(dir.path(), "a", &prog, &[("leaf", "event"), ("op_add", "event")]);
    let agent = AgentProc::start(&plan_a, &an.url, "live", dir.path());
    let run = {
        let prog = prog.clone();
        std::thread::spawn(move || run_prog(&prog, 5, 3.6))
    };
    let push = |version: u64, points: &[(&str, pb::TraceMode)]| push_plan(&an.url, "live", &prog, version, points);
    sleep(Duration::from_millis(1000));
    let t1 = monotonic_ns();
    let b = push(2, &[("op_add", pb::TraceMode::Event), ("chain2", pb::TraceMode::Event)]);
    let t1_done = monotonic_ns();
    assert_eq!((b.attached, b.detached), (1, 1), "B adds chain2 and drops leaf; op_add stays attached");
    assert_eq!(b.relinked, 1, "leaf's link is rebuilt with op_add handed over");
    sleep(Duration::from_millis(1000));
    let t2 = monotonic_ns();
    let c = push(3, &[("op_add", pb::TraceMode::Event), ("leaf", pb::TraceMode::Event)]);
    let t2_done = monotonic_ns();
    assert_eq!((c.attached, c.detached), (1, 1), "C re-adds leaf and drops chain2");
    run.join().unwrap();
    agent.stop();

    let (table, trees) = rt().block_on(afcts(&an.url, "live"));
    let white = |f: &Forest, t: &FuncTable| -> std::collections::BTreeSet<String> {
        f.nodes.iter().filter(|n| n.color == Color::White).map(|n| t.get(n.func).name.to_string()).collect()
    };
    // Union of the threads of each window: the worker thread never calls op_add.
    let mut per_window: std::collections::BTreeMap<u64, (pb::WindowInfo, std::collections::BTreeSet<String>)> =
        Default::default();
    for (w, _, f) in &trees {
        per_window.entry(w.id).or_insert_with(|| (w.clone(), Default::default())).1.extend(white(f, &table));
    }
    let mut phases = [0usize; 3];
    let mut op_add_in = [false; 3];
    for (w, traced) in per_window.values() {
        let phase = if w.end_ns <= t1 {
            0
        } else if w.start_ns >= t1_done && w.end_ns <= t2 {
            1
        } else if w.start_ns >= t2_done {
            2
        } else {
            continue; // straddles a plan change
        };
        let allowed: &[&str] = [&["leaf", "op_add"][..], &["op_add", "chain2"], &["op_add", "leaf"]][phase];
        assert!(traced.iter().all(|n| allowed.contains(&n.as_str())), "phase {phase} window traced {traced:?}");
        // A 200 ms window can hold only the worker thread's tail of an iteration (leaf, never
        // op_add), so op_add is looked for per phase, not per window.
        op_add_in[phase] |= traced.contains("op_add");
        phases[phase] += 1;
    }
    assert!(phases.iter().all(|n| *n >= 2), "windows per phase: {phases:?}");
    assert_eq!(op_add_in, [true; 3], "op_add stays in every plan and must never stop");
}

/// Rebuilding links while threads call the traced functions as fast as they can: every plan
/// change drops a function, so the link of the others is rebuilt and they are handed over to a
/// new link; `hot_a`, in every plan, must still be counted exactly once per call. A function
/// whose first instruction uprobes refuse is left out and reported, not fatal.
#[test]
fn relinking_under_load_loses_and_doubles_no_call() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = dir.path().join("hotloop");
    let status = std::process::Command::new("gcc")
        .args(["-O0", "-pthread", "-o"]) // -O0: every function starts with `push rbp`, an emulated probe
        .arg(&prog)
        .arg(repo_root().join("testbed/progs/hotloop.c"))
        .status()
        .unwrap();
    assert!(status.success());
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let plan = write_plan(
        dir.path(),
        "h",
        &prog,
        &[("hot_a", "count"), ("hot_b", "count"), ("hot_c", "count"), ("locked_fn", "count")],
    );
    let (threads, calls) = (2u64, 3_000_000u64);
    let mut run = std::process::Command::new(&prog)
        .args([threads.to_string(), calls.to_string()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Each handover stays 100 ms in its middle phase, where both links' probes fire on every
    // call and only the per-thread marks keep hot_a from being counted twice (or not at all,
    // were the kernel to run the old probe first): most calls below happen in that phase.
    let agent = AgentProc::start_with(&plan, &an.url, "relink", dir.path(), &["--handover-hold", "100ms"]);
    let mut first = None;
    for _ in 0..200 {
        first = rt().block_on(agent_info(&an.url, "relink")).and_then(|a| a.last_plan);
        if first.is_some() {
            break;
        }
        sleep(Duration::from_millis(25));
    }
    let t0 = std::time::Instant::now();
    use std::io::Write;
    run.stdin.take().unwrap().write_all(b"go\n").unwrap();
    use pb::TraceMode::Count;
    // Each change drops the function that shares hot_a's link, so hot_a is handed over every time.
    let plans: [&[(&str, pb::TraceMode)]; 2] =
        [&[("hot_a", Count), ("hot_c", Count)], &[("hot_a", Count), ("hot_b", Count)]];
    let mut relinked = 0;
    let mut version = 1;
    while run.try_wait().unwrap().is_none() {
        let r = push_plan(&an.url, "relink", &prog, version, plans[version as usize % 2]);
        relinked += r.relinked;
        version += 1;
        sleep(Duration::from_millis(50));
    }
    assert!(run.wait().unwrap().success());
    eprintln!("{} plan changes in {:.1?}", version - 1, t0.elapsed());
    agent.stop();
    let counts = rt().block_on(async {
        let mut q = afetm_proto::query_client::QueryClient::connect(an.url.clone()).await.unwrap();
        q.counts(pb::CountsRequest { agent_id: "relink".into() }).await.unwrap().into_inner().counts
    });
    let a = counts.iter().find(|c| c.function == "hot_a").expect("hot_a counted");
    assert!(
        version >= 10 && u64::from(relinked) >= version - 2,
        "only {} plan changes ({relinked} relinked) while the program ran",
        version - 1
    );
    assert_eq!(a.calls, threads * calls, "hot_a over {} plan changes, {relinked} functions relinked", version - 1);
    for f in ["hot_b", "hot_c"] {
        let c = counts.iter().find(|c| c.function == f).map_or(0, |c| c.calls);
        assert!(c > 0 && c < threads * calls, "{f} was traced part of the time: {c}");
    }
    let first = first.expect("first plan report");
    assert_eq!(first.unprobeable, vec!["locked_fn".to_string()], "locked_fn cannot be probed");
    assert_eq!(first.probes.len(), 3);
    assert!(!counts.iter().any(|c| c.function == "locked_fn"));
}

/// Trace point selection end to end on calltree: count every function (weights), trace all of
/// them (normal FCTs), `afetm-analyzer weights` + `select` (MMAS, coloring), then trace with
/// the selected plan: it respects the bound (eq 4), covers blocks, marks F^callstack, and the
/// agent traces exactly its functions.
#[test]
fn selected_plan_from_sampled_weights_traces_its_functions() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), true);
    let db = dir.path().join("db.sqlite");
    let an = AnalyzerProc::start(&db, free_port(), &["--window", "300ms", "--grace", "100ms"]);
    let agent =
        AgentProc::start(&write_plan(dir.path(), "count", &prog, &[("*", "count")]), &an.url, "count", dir.path());
    run_prog(&prog, 40, 0.0);
    agent.stop();
    let agent =
        AgentProc::start(&write_plan(dir.path(), "full", &prog, &[("*", "event")]), &an.url, "full", dir.path());
    run_prog(&prog, 5, 0.0);
    agent.stop();

    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new(analyzer_bin()).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "afetm-analyzer {args:?}: {text}");
        text
    };
    let weights = dir.path().join("w.json");
    let wp = weights.to_str().unwrap();
    cli(&[
        "weights",
        "--server",
        &an.url,
        "--agent",
        "count",
        "--module",
        "calltree-fp",
        "--period",
        "1s",
        "--out",
        wp,
    ]);
    let w: serde_json::Value = serde_json::from_slice(&std::fs::read(&weights).unwrap()).unwrap();
    // 40 iterations: leaf 17 calls each (see count_only_mode_counts_every_call).
    assert_eq!(w["functions"]["leaf"]["calls"], 17 * 40, "{w}");
    let plan = dir.path().join("plan.json");
    let out = cli(&[
        "select",
        "--elf",
        prog.to_str().unwrap(),
        "--weights",
        wp,
        "--budget",
        "30%",
        "--db",
        db.to_str().unwrap(),
        "--normal-agent",
        "full",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let plan_file = PlanFile::parse(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let sel = plan_file.selection.clone().expect("selection summary");
    assert!(sel.weight <= sel.bound + 1e-9, "eq 4: {sel:?}");
    assert!(sel.covered > 0 && sel.covered <= sel.blocks, "{sel:?}");
    let names: std::collections::BTreeSet<String> = plan_file.points.iter().map(|p| p.function.clone()).collect();
    for p in &plan_file.points {
        let cs = sel.callstack.contains(&p.function);
        assert_eq!(p.mode == afetm_proto::plan::Mode::Callstack, cs, "{} in F^callstack: {cs}", p.function);
    }
    eprintln!("{out}");
    assert!(out.contains("greedy:"), "{out}");

    let agent = AgentProc::start(&plan, &an.url, "selected", dir.path());
    run_prog(&prog, 5, 0.0);
    agent.stop();
    let (table, trees) = rt().block_on(afcts(&an.url, "selected"));
    let white: std::collections::BTreeSet<String> = trees
        .iter()
        .flat_map(|(_, _, f)| {
            f.nodes.iter().filter(|n| n.color == Color::White).map(|n| table.get(n.func).name.to_string())
        })
        .collect();
    assert!(!white.is_empty(), "the selected plan traced nothing; plan {names:?}");
    assert!(white.is_subset(&names), "traced {white:?} outside the plan {names:?}");

    // Cost-aware: the host's probe costs, then plans bounded in probe CPU.
    let costs = dir.path().join("costs.json");
    let out = std::process::Command::new(agent_bin()).arg("--calibrate").arg(&costs).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "calibration failed: {text}");
    let c = afetm_proto::costs::ProbeCosts::load(&costs).unwrap();
    eprintln!("{text}");
    assert!(c.emulated.count_ns > 0.0 && c.emulated.event_ns > 0.0 && c.emulated.callstack_ns > 0.0, "{c:?}");
    assert!(c.single_stepped.event_ns > 3.0 * c.emulated.event_ns, "single-stepping costs more: {c:?}");
    assert!(c.callstack_frames > 0, "call stacks were unwound in the kernel: {c:?}");
    let (cp, pp) = (costs.to_str().unwrap(), plan.to_str().unwrap());
    let common = ["select", "--elf", prog.to_str().unwrap(), "--weights", wp, "--db", db.to_str().unwrap()];
    for extra in [&["--budget", "30%"][..], &["--max-overhead", "0.1%"]] {
        let mut args = common.to_vec();
        args.extend(["--normal-agent", "full", "--costs", cp, "--out", pp]);
        args.extend(extra);
        let out = cli(&args);
        let sel = PlanFile::parse(&std::fs::read_to_string(&plan).unwrap()).unwrap().selection.unwrap();
        let p = sel.predicted.clone().expect("prediction");
        let cost = p.probe_ns_per_s.expect("a cost-aware plan predicts its probe CPU");
        assert!(out.contains("probe CPU") && out.contains("of the bound"), "{out}");
        assert!(cost <= sel.bound * (1.0 + 1e-9), "{extra:?}: predicted {cost} ns/s over the bound {}", sel.bound);
        if extra[0] == "--max-overhead" {
            assert_eq!(sel.bound, 0.001 * 1e9, "0.1% of a core");
            assert_eq!(p.max_overhead, Some(0.001));
        }
    }
}

/// Count-only mode counts every call and sends no events.
#[test]
fn count_only_mode_counts_every_call() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), false);
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), free_port(), &[]);
    let plan = write_plan(dir.path(), "c", &prog, &[("leaf", "count"), ("main", "event")]);
    let agent = AgentProc::start(&plan, &an.url, "counter", dir.path());
    run_prog(&prog, 100, 0.0);
    agent.stop();
    let counts = rt().block_on(async {
        let mut q = afetm_proto::query_client::QueryClient::connect(an.url.clone()).await.unwrap();
        q.counts(pb::CountsRequest { agent_id: "counter".into() }).await.unwrap().into_inner().counts
    });
    let leaf = counts.iter().find(|c| c.function == "leaf").expect("leaf counted");
    // Per iteration: main thread 1 + 1 + fib(5)'s 8 leaves, worker 1 + 1 + fib(4)'s 5 leaves.
    assert_eq!(leaf.calls, 17 * 100);
    let info = rt().block_on(agent_info(&an.url, "counter")).unwrap();
    assert_eq!(info.events, 1, "only main's single call is an event");
}

/// The agent keeps running while the analyzer is down, says so, queues, and delivers once the
/// analyzer appears.
#[test]
fn unreachable_analyzer_is_retried_and_queued_events_arrive() {
    require_root!();
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), true);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let plan = write_plan(dir.path(), "q", &prog, &[("op_add", "event")]);
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent = AgentProc::start_with(&plan, &url, "late", dir.path(), &["--metrics-listen", &metrics]);
    run_prog(&prog, 50, 0.0);
    sleep(Duration::from_millis(500));
    assert!(
        agent.log().contains("analyzer unreachable"),
        "agent should say the analyzer is unreachable: {}",
        agent.log()
    );
    // The metrics say the same: every call read, nothing acknowledged, batches waiting.
    let m = scrape(&metrics);
    assert_eq!(metric(&m, "afetm_agent_events_total"), Some(50.0), "{m}");
    assert_eq!(metric(&m, "afetm_agent_batches_acked_total"), Some(0.0), "{m}");
    assert!(metric(&m, "afetm_agent_connect_failures_total") >= Some(1.0), "{m}");
    assert!(metric(&m, "afetm_agent_outbox_batches") >= Some(1.0), "{m}");
    assert_eq!(metric(&m, r#"afetm_agent_probes{placement="unprobeable"}"#), Some(0.0), "{m}");
    let placed = metric(&m, r#"afetm_agent_probes{placement="emulated"}"#).unwrap_or(0.0)
        + metric(&m, r#"afetm_agent_probes{placement="single_stepped"}"#).unwrap_or(0.0);
    assert_eq!(placed, 1.0, "op_add is probed once: {m}");
    assert_eq!(metric(&m, "afetm_agent_plan_apply_seconds_count"), Some(1.0), "{m}");
    let an = AnalyzerProc::start(&dir.path().join("db.sqlite"), port, &[]);
    let mut events = 0;
    for _ in 0..100 {
        events = rt().block_on(agent_info(&an.url, "late")).map(|a| a.events).unwrap_or(0);
        if events >= 50 {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let m = scrape(&metrics);
    agent.stop();
    assert_eq!(events, 50, "every queued op_add call arrives once");
    assert!(metric(&m, "afetm_agent_batches_acked_total") >= Some(1.0), "{m}");
    assert_eq!(metric(&m, "afetm_agent_queue_drops_total"), Some(0.0), "{m}");
}

fn agent_error(plan: &std::path::Path, as_nobody: bool) -> String {
    let mut cmd = if as_nobody {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(agent_bin());
        c
    } else {
        std::process::Command::new(agent_bin())
    };
    let out = cmd.arg("--plan").arg(plan).args(["--analyzer", "http://127.0.0.1:9"]).output().expect("run agent");
    assert_eq!(out.status.code(), Some(1), "agent should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.trim().lines().count(), 1, "one clear line, got: {err}");
    err
}

#[test]
fn bad_targets_fail_with_one_clear_line() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let prog = build_calltree(dir.path(), true);
    let e = agent_error(&write_plan(dir.path(), "u", &prog, &[("no_such_function", "event")]), false);
    assert!(e.contains("unknown function \"no_such_function\""), "{e}");
    let e = agent_error(&write_plan(dir.path(), "m", &dir.path().join("missing"), &[("main", "event")]), false);
    assert!(e.contains("no such file"), "{e}");
    let gone = (100_000..4_000_000).find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()).unwrap();
    let plan = dir.path().join("pid.json");
    std::fs::write(&plan, format!(r#"{{"target":{{"pid":{gone}}},"points":[{{"function":"main","mode":"event"}}]}}"#))
        .unwrap();
    let e = agent_error(&plan, false);
    assert!(e.contains(&format!("process {gone} is gone")), "{e}");
    std::fs::write(dir.path().join("bad.json"), "{not json").unwrap();
    let e = agent_error(&dir.path().join("bad.json"), false);
    assert!(e.contains("cannot parse plan"), "{e}");
    // Same binary, no privileges.
    let world = tempfile::Builder::new().prefix("afetm-nobody").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(world.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let plan = write_plan(world.path(), "n", &prog, &[("main", "event")]);
    std::fs::set_permissions(&plan, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = agent_error(&plan, true);
    assert!(e.contains("must run as root"), "{e}");
}
