//! The metrics and the baselines on hand-made cases with known answers.
use afetm_diagnosis::Class;
use afetm_eval::{
    case::{Case, Window},
    method::{Method, Suspect, Verdict},
    methods::{
        bag::Bag,
        edc::{FctEdc, first_difference},
        gdc::{AfctGdc, influence},
        logs::{LogIdealized, is_error_line, template},
    },
    metrics::{Reference, aggregate, chance, nearest_known, outcome, quantile, rate_text, wilson},
};
use afetm_fault::FaultKind;
use afetm_proto as pb;

/// A tree from (function, parent index) in preorder.
fn tree(nodes: &[(&str, i32)]) -> pb::Tree {
    let mut t = pb::Tree::default();
    for (i, (f, p)) in nodes.iter().enumerate() {
        t.nodes.push(pb::TreeNode {
            function: f.to_string(),
            module: "m".into(),
            color: pb::Color::White as i32,
            parent: *p,
            children: Vec::new(),
            calls: 1,
        });
        if *p >= 0 {
            t.nodes[*p as usize].children.push(i as u32);
        }
    }
    t
}

fn fault(function: &str, kind: FaultKind) -> Class {
    Class::Fault { function: function.into(), kind }
}

fn case(run: i64, truth: Class, windows: Vec<(bool, pb::Tree)>) -> Case {
    Case {
        windows: windows
            .into_iter()
            .map(|(faulty, t)| Window { faulty, full: Some(t.clone()), afct: Some(t), ..Window::default() })
            .collect(),
        ..Case::new(run, truth)
    }
}

fn verdict(window: usize, error: bool, normality: f64, top: &[(&str, FaultKind)]) -> Verdict {
    Verdict {
        window: Some(window),
        error,
        normality,
        top: top.iter().map(|(f, k)| Suspect { function: f.to_string(), kind: Some(*k) }).collect(),
        assumed_located: false,
        compute_us: 10,
        reported_unix_ms: Some(1_000 + window as i64 * 1000),
        lines: Vec::new(),
    }
}

#[test]
fn root_cause_lines_and_detection_f1() {
    let t = tree(&[("main", -1), ("f", 0)]);
    let mut c = case(1, fault("f", FaultKind::Crash), vec![(true, t.clone())]);
    c.root_line = Some("[29-Nov-2026 01:25:37 UTC] shop: Connection refused".into());
    let mut v = verdict(0, true, 0.1, &[]);
    // The same line at another time is the same line; it is second here.
    v.lines = vec!["GET / OK".into(), "[30-Nov-2026 02:00:00 UTC] shop: Connection refused".into()];
    let o = outcome(&c, &[v.clone()], &Reference::default());
    assert_eq!(o.line_hit, Some((false, true)));
    // A method that names no line is not scored on lines; a normal run has no root line.
    let o2 = outcome(&c, &[verdict(0, true, 0.1, &[])], &Reference::default());
    assert_eq!(o2.line_hit, None);
    let n = case(2, Class::Normal, vec![(false, t.clone())]);
    let alarm = outcome(&n, &[verdict(0, true, 0.2, &[])], &Reference::default());
    let missed = outcome(&case(3, fault("f", FaultKind::Crash), vec![(true, t)]), &[], &Reference::default());
    let s = aggregate(&[o, alarm, missed], vec![]);
    // TP 1, FP 1, FN 1: F1 = 2 / 4.
    assert!((s.f1 - 0.5).abs() < 1e-9, "{}", s.f1);
    assert_eq!((s.line_runs, s.hr1, s.hr3), (1, 0.0, 1.0));
}

#[test]
fn run_outcomes_and_rates() {
    // main(a(f), b): preorder main 0, a 1, f 2, b 3.
    let normal = tree(&[("main", -1), ("a", 0), ("f", 1), ("b", 0)]);
    let reference = Reference::from_trees([&normal]);
    assert_eq!(reference.distance("f", "b"), Some(1));
    assert_eq!(reference.distance("main", "f"), Some(2));
    assert_eq!(reference.distance("zzz", "f"), None);

    let mut c = case(1, fault("f", FaultKind::Input), vec![(false, normal.clone()), (true, normal.clone())]);
    c.injected_unix_ms = Some(1_500);
    // Window 0 alarms with a wrong top-1 but is more normal than window 1, whose top-1 is b
    // and top-2 the right function with the right kind.
    let v = vec![
        verdict(0, true, 0.4, &[("a", FaultKind::Crash)]),
        verdict(1, true, 0.1, &[("b", FaultKind::Input), ("f", FaultKind::Input)]),
    ];
    let o = outcome(&c, &v, &reference);
    assert!(o.detected);
    assert!(!o.top1_function && o.top3_function && !o.top1_class && o.top3_class);
    assert_eq!(o.located.as_deref(), Some("b"));
    assert_eq!(o.fld, Some(1));
    assert_eq!(o.fdd_ms, Some(500.0), "window 1 reported at 2000, injection at 1500");
    assert_eq!((o.windows.faulty, o.windows.faulty_alarmed, o.windows.faulty_located), (1, 1, 0));
    assert_eq!((o.windows.normal, o.windows.normal_alarmed), (1, 1));

    // A located run, an undetected run, a normal run with a false alarm and one without.
    let right = outcome(
        &case(2, fault("f", FaultKind::Input), vec![(true, normal.clone())]),
        &[verdict(0, true, 0.0, &[("f", FaultKind::Input)])],
        &reference,
    );
    assert!(right.top1_function && right.top1_class && right.fld == Some(0));
    let missed = outcome(
        &case(3, fault("a", FaultKind::Crash), vec![(true, normal.clone())]),
        &[verdict(0, false, 0.9, &[("a", FaultKind::Crash)])],
        &reference,
    );
    assert!(!missed.detected && !missed.top1_function, "an undetected run is not located even if its top-1 is right");
    let alarm =
        outcome(&case(4, Class::Normal, vec![(false, normal.clone())]), &[verdict(0, true, 0.1, &[])], &reference);
    let quiet =
        outcome(&case(5, Class::Normal, vec![(false, normal.clone())]), &[verdict(0, false, 0.9, &[])], &reference);
    let s = aggregate(&[o, right, missed, alarm, quiet], vec![1, 2, 3]);
    assert_eq!((s.fault_runs, s.normal_runs), (3, 2));
    assert!((s.edr - 2.0 / 3.0).abs() < 1e-9);
    assert!((s.flr_top1_function - 1.0 / 3.0).abs() < 1e-9);
    assert!((s.flr_top3_function - 2.0 / 3.0).abs() < 1e-9);
    assert!((s.flr_top3_class - 2.0 / 3.0).abs() < 1e-9);
    assert!((s.false_alarm_rate - 0.5).abs() < 1e-9);
    assert_eq!(s.fld, vec![1, 0]);
    assert_eq!(s.per_kind["input"].runs, 2);
    assert_eq!(s.per_kind["crash"].detected, 0);
    let top3: u64 = s.per_kind.values().map(|k| k.located_top3).sum();
    assert_eq!(top3, 2, "per kind, the runs whose function is in the top 3 add up to the row's");
    assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
    assert_eq!(quantile(&[], 0.5), None);
}

#[test]
fn assumed_location_counts_when_detected() {
    let mut v = verdict(0, true, -1.0, &[]);
    v.assumed_located = true;
    v.window = None;
    v.top = vec![Suspect { function: "serverLog".into(), kind: None }];
    let normal = tree(&[("main", -1), ("serverLog", 0), ("f", 0)]);
    let o = outcome(&case(1, fault("f", FaultKind::Crash), vec![]), &[v], &Reference::from_trees([&normal]));
    assert!(o.top1_function && o.top1_class);
    assert_eq!(o.fld, Some(1), "FLD from the logging function");
}

#[test]
fn fct_edc_thresholds_on_normal_runs_and_locates_the_first_difference() {
    assert_eq!(first_difference(&["m", "a", "b"], &["m", "a", "c"]), vec!["b", "c", "a"]);
    assert_eq!(first_difference(&["m", "a"], &["m", "a", "c"]), vec!["c", "a"]);
    assert!(first_difference(&["m"], &["m"]).is_empty());
    let n1 = tree(&[("main", -1), ("a", 0), ("b", 0)]);
    let n2 = tree(&[("main", -1), ("a", 0), ("b", 0), ("b", 0)]);
    let train =
        vec![case(1, Class::Normal, vec![(false, n1.clone())]), case(2, Class::Normal, vec![(false, n2.clone())])];
    let edc = FctEdc::fit(&train).unwrap();
    assert_eq!(edc.threshold(), 1, "the two normal runs differ by one node");
    let ok = edc.window(&Window { full: Some(n1.clone()), ..Window::default() }).unwrap().unwrap();
    assert!(!ok.error);
    // main(x(y, z), b): three edits from n1.
    let bad = tree(&[("main", -1), ("x", 0), ("y", 1), ("z", 1), ("b", 0)]);
    let v = edc.window(&Window { full: Some(bad), ..Window::default() }).unwrap().unwrap();
    assert!(v.error);
    assert_eq!(v.normality, -3.0);
    assert_eq!(v.top[0].function, "x");
}

#[test]
fn afct_gdc_picks_the_most_influential_entry() {
    assert_eq!(influence(0.0, 2.0), 1.0);
    assert!((influence(2.0, 2.0) - (-0.5f64).exp()).abs() < 1e-12);
    let normal = tree(&[("main", -1), ("a", 0)]);
    let f_tree = tree(&[("main", -1), ("a", 0), ("f", 1), ("f", 1)]);
    let g_tree = tree(&[("main", -1), ("g", 0), ("g", 1), ("g", 2)]);
    let train = vec![
        case(1, Class::Normal, vec![(false, normal.clone())]),
        case(2, fault("f", FaultKind::Input), vec![(true, f_tree.clone()), (false, normal.clone())]),
        case(3, fault("g", FaultKind::Deadlock), vec![(true, g_tree)]),
        // A faulty window that looks normal belongs to the normal entry.
        case(4, fault("h", FaultKind::Crash), vec![(true, normal.clone())]),
    ];
    let gdc = AfctGdc::fit(&train).unwrap();
    assert_eq!(gdc.entries(), 3, "normal, input@f, deadlock@g (crash@h only ever looked normal)");
    let probe = tree(&[("main", -1), ("a", 0), ("f", 1), ("f", 1), ("c", 0)]);
    let v = gdc.window(&Window { afct: Some(probe), ..Window::default() }).unwrap().unwrap();
    assert!(v.error);
    assert_eq!(v.top[0], Suspect { function: "f".into(), kind: Some(FaultKind::Input) });
    let v = gdc.window(&Window { afct: Some(normal), ..Window::default() }).unwrap().unwrap();
    assert!(!v.error);
}

#[test]
fn log_method_ignores_what_normal_runs_log() {
    assert!(is_error_line("redis.log", "123:M 28 Nov 2026 22:29:00.976 # Redis is starting"));
    assert!(!is_error_line("redis.log", "123:M 28 Nov 2026 22:29:00.976 * Ready to accept connections"));
    assert!(is_error_line("nginx-error.log", "2026/11/28 22:29:00 [error] 12#0: upstream timed out"));
    assert!(!is_error_line("nginx-error.log", "2026/11/28 22:29:00 [notice] 12#0: start"));
    assert!(is_error_line("apache0-error.log", "[Sat Nov 28 22:29:00 2026] [proxy_fcgi:error] [pid 9] AH01079"));
    assert!(!is_error_line("nginx-access.log", "GET / 500"));
    assert_eq!(template("pid=123 at 22:29:00"), "pid=0 at 0:0:0");
    let start = "1:M 28 Nov 2026 22:29:00.976 # Redis version=7.0.15 just started".to_string();
    let mut n = case(1, Class::Normal, vec![]);
    n.logs = vec![("redis.log".into(), start.replace("1:M", "77:M"))];
    let logs = LogIdealized::fit(&[n], "redis");
    let mut quiet = case(2, Class::Normal, vec![]);
    quiet.logs = vec![("redis.log".into(), start.clone())];
    assert!(!logs.diagnose(&quiet).unwrap()[0].error);
    let mut loud = case(3, fault("f", FaultKind::Crash), vec![]);
    loud.logs =
        vec![("redis.log".into(), start), ("php-error.log".into(), "[28-Nov-2026] shop: Connection refused".into())];
    let v = logs.diagnose(&loud).unwrap();
    assert!(v[0].error && v[0].assumed_located);
    assert_eq!(v[0].top[0].function, "serverLog");
}

#[test]
fn bag_of_functions_separates_distinct_bags() {
    let normal = tree(&[("main", -1), ("a", 0), ("b", 0)]);
    let f_tree = tree(&[("main", -1), ("f", 0), ("f", 0), ("f", 0)]);
    let mut train = Vec::new();
    for r in 0..6 {
        train.push(case(r, Class::Normal, vec![(false, normal.clone())]));
        train.push(case(10 + r, fault("f", FaultKind::Input), vec![(true, f_tree.clone())]));
    }
    let bag = Bag::fit(&train).unwrap();
    let v = bag.window(&Window { afct: Some(f_tree), ..Window::default() }).unwrap().unwrap();
    assert!(v.error, "P(normal) {}", v.normality);
    assert_eq!(v.top[0].function, "f");
    let v = bag.window(&Window { afct: Some(normal), ..Window::default() }).unwrap().unwrap();
    assert!(!v.error, "P(normal) {}", v.normality);
}

#[test]
fn an_alarm_before_the_injection_is_a_false_alarm_not_a_detection() {
    let normal = tree(&[("main", -1), ("a", 0), ("f", 1), ("b", 0)]);
    // Window 0 ended at 100, before the first application at 150; window 1 ends at 200.
    let mut c = case(1, fault("f", FaultKind::Input), vec![(false, normal.clone()), (true, normal.clone())]);
    c.first_applied_ns = Some(150);
    c.windows[0].end_ns = Some(100);
    c.windows[1].end_ns = Some(200);
    let reference = Reference::from_trees([&normal]);
    // Only the lead window alarms, naming the right function: not detected.
    let early =
        outcome(&c, &[verdict(0, true, 0.0, &[("f", FaultKind::Input)]), verdict(1, false, 0.9, &[])], &reference);
    assert!(!early.detected && early.alarmed_before);
    assert!(!early.top1_function, "a lead window's suspects are not a location");
    assert_eq!(early.least, Some((0.9, Some(1))), "the least normal verdict after the injection");
    assert_eq!(early.alarmed_windows, [0], "the lead window's alarm is listed");
    assert_eq!((early.windows.normal, early.windows.normal_alarmed), (1, 1), "the lead window is a normal window");
    assert_eq!(early.windows.faulty, 1);
    // The lead alarms less normal than the faulty window: located reads the faulty one.
    let both = outcome(
        &c,
        &[verdict(0, true, 0.0, &[("a", FaultKind::Input)]), verdict(1, true, 0.3, &[("f", FaultKind::Input)])],
        &reference,
    );
    assert!(both.detected && both.alarmed_before && both.top1_function && both.top1_class);
    // A window ending exactly at the first application ended before it.
    c.windows[0].end_ns = Some(150);
    assert!(!outcome(&c, &[verdict(0, true, 0.0, &[])], &reference).detected);
    let s = aggregate(&[early, both], vec![]);
    assert_eq!((s.counts.detected, s.counts.pre_injection_alarms, s.fault_runs), (1, 2, 2));
    // A normal run: every alarm is a false alarm, whatever the window's end.
    let mut n = case(2, Class::Normal, vec![(false, normal)]);
    n.windows[0].end_ns = Some(100);
    n.first_applied_ns = None;
    let o = outcome(&n, &[verdict(0, true, 0.1, &[])], &reference);
    assert!(o.detected && !o.alarmed_before);
    assert_eq!(aggregate(&[o], vec![]).counts.false_alarms, 1);
}

#[test]
fn wilson_intervals_and_rates_with_counts() {
    let (lo, hi) = wilson(0, 30).unwrap();
    assert_eq!(lo, 0.0);
    assert!((hi - 0.1135).abs() < 1e-3, "0 of 30: upper bound {hi}");
    let (lo, hi) = wilson(0, 6).unwrap();
    assert!((hi - 0.390).abs() < 2e-3 && lo == 0.0, "0 of 6 bounds the rate only below ~39%: {hi}");
    let (lo, hi) = wilson(9, 34).unwrap();
    assert!((lo - 0.146).abs() < 2e-3 && (hi - 0.431).abs() < 2e-3, "{lo} {hi}");
    let (lo, hi) = wilson(20, 20).unwrap();
    assert!((lo - 0.839).abs() < 2e-3 && hi == 1.0);
    assert_eq!(wilson(0, 0), None);
    assert_eq!(rate_text(9, 34), "26% (9/34, 15-43%)");
    assert_eq!(rate_text(0, 0), "- (0/0)");
}

#[test]
fn unseen_functions_are_scored_against_the_nearest_trained_one_and_chance_is_printed() {
    // main(a(f, g), b): preorder main 0, a 1, f 2, g 3, b 4.
    let normal = tree(&[("main", -1), ("a", 0), ("f", 1), ("g", 1), ("b", 0)]);
    let reference = Reference::from_trees([&normal]);
    let known: std::collections::BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
    assert_eq!(nearest_known(&reference, "g", &known), Some("b"), "b is 1 position away, a 2");
    assert_eq!(nearest_known(&reference, "zzz", &known), None);
    let mut c = case(1, fault("g", FaultKind::Crash), vec![(true, normal.clone())]);
    c.held_out = Some(afetm_fddb::HeldOut::Function);
    c.located_as = nearest_known(&reference, "g", &known).map(str::to_string);
    let o = outcome(&c, &[verdict(0, true, 0.0, &[(c.located_as.as_deref().unwrap(), FaultKind::Crash)])], &reference);
    assert!(o.top1_function && o.top1_class, "named the nearest trained function");
    assert_eq!(o.fld, reference.distance(c.located_as.as_deref().unwrap(), "g"), "FLD to the injected function");
    let train = vec![
        case(10, fault("a", FaultKind::Crash), vec![]),
        case(11, fault("a", FaultKind::Input), vec![]),
        case(12, fault("b", FaultKind::Crash), vec![]),
        case(13, Class::Normal, vec![]),
    ];
    // Scored: g (as b, its nearest trained function) and a.
    let scored = vec![c, case(2, fault("a", FaultKind::Crash), vec![]), case(3, Class::Normal, vec![])];
    let ch = chance(&train, &scored).unwrap();
    assert_eq!((ch.functions, ch.majority_function.as_str()), (2, "a"));
    assert!((ch.uniform - 0.5).abs() < 1e-9 && (ch.majority - 0.5).abs() < 1e-9, "{ch:?}");
    assert_eq!(chance(&train, &[case(4, Class::Normal, vec![])]), None);
}

#[test]
fn manifested_runs_have_their_own_edr() {
    let t = tree(&[("main", -1), ("f", 0)]);
    let mut showed = case(1, fault("f", FaultKind::Input), vec![(true, t.clone())]);
    showed.manifested = Some(true);
    let mut quiet = case(2, fault("f", FaultKind::Input), vec![(true, t.clone())]);
    quiet.manifested = Some(false);
    let a = outcome(&showed, &[verdict(0, true, 0.1, &[])], &Reference::default());
    let b = outcome(&quiet, &[verdict(0, false, 0.9, &[])], &Reference::default());
    let s = aggregate(&[a, b], vec![]);
    assert_eq!((s.counts.manifested, s.counts.manifested_detected), (1, 1));
    assert!((s.edr - 0.5).abs() < 1e-9 && (s.edr_manifested - 1.0).abs() < 1e-9);
}
