//! Held-out runs read from a real FDDB file as the evaluation scores them: the run's first
//! application, each window's end, why its fault was held out, whether it manifested; then an
//! alarm in the lead window (ended before the injection) is a false alarm, not a detection.
use afetm_calltree::tree::{Color, Forest, FuncTable};
use afetm_diagnosis::{
    Class, Diagnosis, Suspect as GcnSuspect,
    fate::{Combine, Rules},
};
use afetm_eval::{
    case::from_fddb,
    method::{Suspect, Verdict},
    methods::afetm::fate_verdicts,
    metrics::{Reference, aggregate, outcome},
};
use afetm_fault::{Applied, Fault, FaultKind};
use afetm_fddb::{
    Done, FateKind, Fddb, FunctionRow, HeldOut, LabelledTree, Manifestation, Phases, Role, Run, RunFate, RunStatus,
};

fn tree(names: &[&str], tid: u32, start_ns: u64, end_ns: u64, faulty: bool) -> LabelledTree {
    let (mut table, mut forest) = (FuncTable::default(), Forest::default());
    let mut parent = None;
    for n in names {
        parent = Some(forest.push(table.intern("m", n), Color::White, parent, 1));
    }
    LabelledTree { forest, table, pid: 1, tid, start_ns, end_ns, faulty }
}

fn run(role: Role, m: Manifestation, first_ns: u64) -> Run {
    Run {
        role,
        status: RunStatus::Ok,
        manifestation: m,
        requests: 10,
        errors: 0,
        mean_latency_us: 1.0,
        applied: u64::from(first_ns > 0),
        kernel_drops: 0,
        queue_drops: 0,
        phases: Phases::default(),
        start: Default::default(),
        wall_ms: 10,
        logs: vec![],
        applications: if first_ns > 0 {
            vec![Applied { pid: 1, tid: 1, first_ns, last_ns: first_ns + 10, count: 1 }]
        } else {
            vec![]
        },
        fates: vec![],
    }
}

/// An FDDB for target redis of module `m` tracing main, call and other; `call` is the
/// function under test.
fn fddb_with_call(dir: &std::path::Path) -> (Fddb, i64, i64) {
    let mut db = Fddb::open(&dir.join("fddb.sqlite")).unwrap();
    let t = db.target("redis", "m").unwrap();
    db.add_traced(t, &["main".into(), "call".into(), "other".into()]).unwrap();
    let row = FunctionRow { name: "call".into(), params: Some(1), returns_value: Some(true), calls_per_sec: 1.0 };
    let f = db.function(t, &row).unwrap();
    (db, t, f)
}

#[test]
fn eval_runs_from_the_fddb_carry_injection_time_window_ends_and_held_out_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, f) = fddb_with_call(dir.path());
    let trained = db.fault(f, Fault::Input { arg: 0, bit: 3 }).unwrap();
    let unseen = db.held_out_fault(f, Fault::Input { arg: 0, bit: 17 }, HeldOut::Spec).unwrap();
    db.record_run(
        t,
        None,
        &run(Role::Train, Manifestation::Normal, 0),
        &[tree(&["main", "call"], 1, 0, 1000, false)],
        Done::No,
    )
    .unwrap();
    db.record_run(
        t,
        Some(trained),
        &run(Role::Train, Manifestation::Errors, 1500),
        &[tree(&["main", "call", "other"], 1, 1000, 2000, true)],
        Done::Yes,
    )
    .unwrap();
    // The held-out run: a lead window [0, 1000) before the first application at 1500, then the
    // faulty one; it showed only in its trees (manifestation nothing, a tree no normal run has).
    let lead = tree(&["main", "call"], 1, 0, 1000, false);
    let hit = tree(&["main", "call", "other"], 1, 1000, 2000, true);
    db.record_run(t, Some(unseen), &run(Role::Eval, Manifestation::Nothing, 1500), &[lead, hit], Done::No).unwrap();
    db.record_run(
        t,
        None,
        &run(Role::Eval, Manifestation::Normal, 0),
        &[tree(&["main", "call"], 1, 0, 1000, false)],
        Done::No,
    )
    .unwrap();

    let cases = from_fddb(&db, "redis", None, Role::Eval).unwrap();
    assert_eq!(cases.len(), 2);
    let c = &cases[0];
    assert_eq!(c.truth, Class::Fault { function: "call".into(), kind: FaultKind::Input });
    assert_eq!((c.first_applied_ns, c.held_out, c.manifested), (Some(1500), Some(HeldOut::Spec), Some(true)));
    assert_eq!(c.windows.iter().map(|w| w.end_ns).collect::<Vec<_>>(), vec![Some(1000), Some(2000)]);
    assert_eq!(cases[1].truth, Class::Normal);
    assert_eq!(cases[1].manifested, None);

    // A method alarming only in the lead window, naming the right function.
    let v = |w: usize, error: bool| {
        let mut v = Verdict::new(
            error,
            if error { 0.0 } else { 1.0 },
            vec![Suspect { function: "call".into(), kind: Some(FaultKind::Input) }],
        );
        v.window = Some(w);
        v
    };
    let o = outcome(c, &[v(0, true), v(1, false)], &Reference::default());
    assert!(!o.detected && o.alarmed_before && !o.top1_function);
    let later = outcome(c, &[v(0, false), v(1, true)], &Reference::default());
    assert!(later.detected && !later.alarmed_before && later.top1_class);
    let s = aggregate(&[o, later], vec![]);
    assert_eq!((s.counts.detected, s.counts.pre_injection_alarms, s.counts.manifested), (1, 1, 2));
    assert_eq!(db.run_counts("redis", Role::Eval).unwrap().fault_ok, 1);
}

/// A crash the campaign recorded with its threads' fates: the fate's verdict lands on the
/// thread that took the signal, after the injection, and names the function the plan's agent
/// would have seen last (the full trace's last call, `other`, is not traced by the plan).
#[test]
fn a_crash_is_located_from_the_fates_the_campaign_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, f) = fddb_with_call(dir.path());
    let crash = db.fault(f, Fault::Crash).unwrap();
    let fate = |tid, took_signal, calls: &[&str]| RunFate {
        window_start_ns: 1000,
        pid: 1,
        tid,
        ts_ns: 1600,
        kind: FateKind::Killed,
        code: 11,
        took_signal,
        last_calls: calls.iter().map(|c| format!("m:{c}")).collect(),
        stack: Vec::new(),
    };
    // Thread 1 made calls and took the SIGSEGV; thread 2 died with it, with no call in the window.
    let fates = vec![fate(1, true, &["main", "call", "other"]), fate(2, false, &["main"])];
    let r = Run { fates, ..run(Role::Eval, Manifestation::Crash, 1500) };
    let trees = [tree(&["main", "call"], 1, 0, 1000, false), tree(&["main", "call", "other"], 1, 1000, 2000, true)];
    db.record_run(t, Some(crash), &r, &trees, Done::No).unwrap();
    let plan = main_and_call_traced();

    let cases = from_fddb(&db, "redis", Some(&plan), Role::Eval).unwrap();
    let c = &cases[0];
    assert_eq!(c.windows.len(), 3, "two trees and thread 2's fate alone");
    let alone = &c.windows[2];
    assert_eq!((alone.tid, alone.end_ns, alone.faulty, alone.afct.is_none()), (2, Some(2000), true, true));
    assert_eq!(c.windows[1].fate.as_ref().map(|f| f.last_calls.clone()), Some(vec!["main".into(), "call".into()]));
    let v = fate_verdicts(c, Rules::all(Combine::Fate), &|_| true, true, |_| Ok(None)).unwrap();
    assert_eq!(v.len(), 1, "one verdict per process window");
    assert_eq!(v[0].window, Some(1), "on the thread that took the signal");
    assert_eq!(v[0].top[0], Suspect { function: "call".into(), kind: Some(FaultKind::Crash) });
    let o = outcome(c, &v, &Reference::default());
    assert!(o.detected && o.top1_class && !o.alarmed_before, "{o:?}");

    // Under the GCN's rule its suspects for that thread's window name the fault, the fate's
    // alarm stays; a thread without a tree keeps the fate's.
    let gcn = |i: usize| {
        let s = GcnSuspect { function: "main".into(), kind: FaultKind::Input, probability: 0.3 };
        Ok((c.windows[i].afct.is_some()).then(|| Diagnosis { p_normal: 0.6, error: false, top: vec![s] }))
    };
    let g = fate_verdicts(c, Rules::all(Combine::Gcn), &|_| true, true, gcn).unwrap();
    assert_eq!((g[0].window, g[0].error, g[0].normality), (Some(1), true, 0.0));
    assert_eq!(g[0].top, [Suspect { function: "main".into(), kind: Some(FaultKind::Input) }]);
    // Rules per fate class: the SIGSEGV is a `signal` fate, not a `kill`.
    let per_class = |rules: &str| {
        fate_verdicts(c, rules.parse().unwrap(), &|_| true, true, gcn).unwrap()[0].top[0].function.clone()
    };
    assert_eq!(per_class("signal=gcn"), "main");
    assert_eq!(per_class("kill=gcn,stop=gcn"), "call");

    // The full trace's view names its last call instead.
    let full = from_fddb(&db, "redis", None, Role::Eval).unwrap();
    let fate_top = |known: &dyn Fn(&str) -> bool| {
        fate_verdicts(&full[0], Rules::all(Combine::Fate), known, true, |_| Ok(None)).unwrap()[0].top[0]
            .function
            .clone()
    };
    assert_eq!(fate_top(&|_| true), "other");
    // Ranking the functions a model knows first names `call`, called before `other`.
    assert_eq!(fate_top(&|f| f == "call"), "call");
}

/// A fate's stack at its signal is the kernel's, the same under every plan: a crash in a
/// function the plan does not trace is named from it, and without it (the ablation) only the
/// traced last calls are there to name.
#[test]
fn a_fates_stack_names_what_the_plan_does_not_trace() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, f) = fddb_with_call(dir.path());
    let crash = db.fault(f, Fault::Crash).unwrap();
    let killed = RunFate {
        window_start_ns: 1000,
        pid: 1,
        tid: 1,
        ts_ns: 1600,
        kind: FateKind::Killed,
        code: 9,
        took_signal: false,
        last_calls: vec!["m:main".into(), "m:call".into()],
        stack: vec!["m:other".into(), "m:main".into(), "libc.so.6:__libc_start_main".into()],
    };
    let r = Run { fates: vec![killed], ..run(Role::Eval, Manifestation::Crash, 1500) };
    let trees = [tree(&["main", "call", "other"], 1, 1000, 2000, true)];
    db.record_run(t, Some(crash), &r, &trees, Done::No).unwrap();
    let plan = main_and_call_traced();
    let cases = from_fddb(&db, "redis", Some(&plan), Role::Eval).unwrap();
    let fate = cases[0].windows[0].fate.as_ref().expect("the fate");
    assert_eq!(fate.stack, ["other", "main", "__libc_start_main"], "the plan does not filter the stack");
    let top = |known: &dyn Fn(&str) -> bool, stacks: bool| -> Vec<String> {
        let v = fate_verdicts(&cases[0], Rules::all(Combine::Fate), known, stacks, |_| Ok(None)).unwrap();
        v[0].top.iter().map(|s| s.function.clone()).collect()
    };
    assert_eq!(top(&|_| true, true), ["other", "main", "__libc_start_main"]);
    assert_eq!(top(&|f| f != "__libc_start_main", true), ["other", "main", "call"], "known ones first");
    assert_eq!(top(&|_| true, false), ["call", "main"], "without the stack: the traced last calls");
}

/// A plan that traces `main` and `call` (not `other`).
fn main_and_call_traced() -> afetm_proto::plan::PlanFile {
    serde_json::from_value(serde_json::json!({
        "target": {"path": "/bin/m"},
        "points": [{"function": "main", "mode": "event"}, {"function": "call", "mode": "event"}]
    }))
    .unwrap()
}
