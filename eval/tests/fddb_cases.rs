//! Held-out runs read from a real FDDB file as the evaluation scores them: the run's first
//! application, each window's end, why its fault was held out, whether it manifested; then an
//! alarm in the lead window (ended before the injection) is a false alarm, not a detection.
use afetm_calltree::tree::{Color, Forest, FuncTable};
use afetm_diagnosis::Class;
use afetm_eval::{
    case::from_fddb,
    method::{Suspect, Verdict},
    metrics::{Reference, aggregate, outcome},
};
use afetm_fault::{Applied, Fault, FaultKind};
use afetm_fddb::{Done, Fddb, FunctionRow, HeldOut, LabelledTree, Manifestation, Phases, Role, Run, RunStatus};

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
        wall_ms: 10,
        logs: vec![],
        applications: if first_ns > 0 {
            vec![Applied { pid: 1, tid: 1, first_ns, last_ns: first_ns + 10, count: 1 }]
        } else {
            vec![]
        },
    }
}

#[test]
fn eval_runs_from_the_fddb_carry_injection_time_window_ends_and_held_out_kind() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Fddb::open(&dir.path().join("fddb.sqlite")).unwrap();
    let t = db.target("redis", "m").unwrap();
    db.add_traced(t, &["main".into(), "call".into(), "other".into()]).unwrap();
    let row = FunctionRow { name: "call".into(), params: Some(1), returns_value: Some(true), calls_per_sec: 1.0 };
    let f = db.function(t, &row).unwrap();
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
