use afetm_calltree::tree::Color;

use super::*;
use crate::dataset::DatasetOptions;

fn tree(names: &[&str], faulty: bool, tid: u32) -> LabelledTree {
    let mut table = FuncTable::default();
    let mut forest = Forest::default();
    let mut parent = None;
    for n in names {
        let id = table.intern("m", n);
        parent = Some(forest.push(id, Color::White, parent, 1));
    }
    LabelledTree { forest, table, pid: 1, tid, start_ns: 0, end_ns: 1_000_000_000, faulty }
}

fn run(role: Role, status: RunStatus, m: Manifestation) -> Run {
    Run {
        role,
        status,
        manifestation: m,
        requests: 10,
        errors: 0,
        mean_latency_us: 1.0,
        applied: 3,
        kernel_drops: 0,
        queue_drops: 0,
        phases: Phases { restart_ms: 1, inject_ms: 2, load_ms: 3, collect_ms: 4 },
        start: Start::Warm,
        wall_ms: 10,
        logs: vec![("redis.log".into(), "line".into())],
        applications: vec![Applied { pid: 1, tid: 1, first_ns: 5, last_ns: 9, count: 3 }],
        fates: Vec::new(),
    }
}

/// Thread 1 killed by SIGSEGV in `call`, thread 2 silent, in the window starting at 0.
fn crash_fates() -> Vec<RunFate> {
    let fate = |tid, kind, code, calls: &[&str]| RunFate {
        window_start_ns: 0,
        pid: 1,
        tid,
        ts_ns: 7,
        kind,
        code,
        took_signal: tid == 1,
        last_calls: calls.iter().map(|c| format!("m:{c}")).collect(),
        stack: if tid == 1 { vec!["libc.so.6:memcpy".into(), "m:call".into(), "m:main".into()] } else { vec![] },
    };
    vec![fate(1, FateKind::Killed, 11, &["main", "call"]), fate(2, FateKind::Silent, 0, &["leaf"])]
}

fn setup(dir: &Path) -> (Fddb, i64, i64, i64) {
    let mut db = Fddb::open(&dir.join("f.sqlite")).unwrap();
    let t = db.target("redis", "m").unwrap();
    db.add_traced(t, &["main".into(), "call".into(), "leaf".into(), "other".into()]).unwrap();
    let f = db
        .function(
            t,
            &FunctionRow { name: "call".into(), params: Some(2), returns_value: Some(false), calls_per_sec: 5.0 },
        )
        .unwrap();
    let a = db.fault(f, Fault::Crash).unwrap();
    assert_eq!(db.fault(f, Fault::Crash).unwrap(), a, "never two rows for one fault");
    let b = db.fault(f, Fault::Input { arg: 0, bit: 3 }).unwrap();
    (db, t, a, b)
}

#[test]
fn novelty_is_per_fault_and_normal_like_trees_are_marked() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, a, b) = setup(dir.path());
    let normal = run(Role::Train, RunStatus::Ok, Manifestation::Normal);
    let r = db.record_run(t, None, &normal, &[tree(&["main", "call"], false, 1)], Done::No).unwrap();
    assert_eq!(r.new, 1);
    // Fault a: one tree equal to the normal one (normal-like), one new; an untouched thread's
    // tree is normal and never counts.
    let crash = run(Role::Train, RunStatus::Ok, Manifestation::Crash);
    let r = db
        .record_run(
            t,
            Some(a),
            &crash,
            &[tree(&["main", "call"], true, 1), tree(&["main"], true, 2), tree(&["main", "leaf"], false, 3)],
            Done::IfNothingNew,
        )
        .unwrap();
    assert_eq!((r.new, r.normal_like, r.done), (1, 1, false));
    // Fault b produces main alone too: new *for b* although a produced it.
    let input = run(Role::Train, RunStatus::Ok, Manifestation::Nothing);
    let r = db.record_run(t, Some(b), &input, &[tree(&["main"], true, 1)], Done::IfNothingNew).unwrap();
    assert_eq!((r.new, r.done), (1, false), "novelty is per (function, fault)");
    // a again with nothing new: done.
    let r = db.record_run(t, Some(a), &crash, &[tree(&["main"], true, 1)], Done::IfNothingNew).unwrap();
    assert_eq!((r.new, r.done), (0, true));
    // b: a run that never applied the fault or dropped events is not a reason to stop.
    let idle = Run { applied: 0, ..run(Role::Train, RunStatus::NotActivated, Manifestation::Nothing) };
    let r = db.record_run(t, Some(b), &idle, &[tree(&["main"], false, 1)], Done::IfNothingNew).unwrap();
    assert!(!r.done, "not activated");
    let dropped = run(Role::Train, RunStatus::Dropped, Manifestation::Nothing);
    assert!(!db.record_run(t, Some(b), &dropped, &[], Done::IfNothingNew).unwrap().done, "dropped");
    // Pending: b (training not done) and, with one evaluation run asked for, a as well.
    let ids = |v: Vec<PendingFault>| v.iter().map(|p| p.id).collect::<Vec<_>>();
    assert_eq!(ids(db.pending(t, 0).unwrap()), vec![b]);
    assert_eq!(ids(db.pending(t, 1).unwrap()), vec![a, b]);
    let eval = run(Role::Eval, RunStatus::Ok, Manifestation::Crash);
    let r = db.record_run(t, Some(a), &eval, &[tree(&["main", "x"], true, 1)], Done::No).unwrap();
    assert_eq!(r.new, 1);
    assert_eq!(ids(db.pending(t, 1).unwrap()), vec![b]);
    let s = db.summary(t).unwrap();
    assert_eq!((s.faults, s.faults_done, s.runs, s.traced), (2, 1, 7, 4));
    assert_eq!((s.faulty_trees, s.normal_like_trees), (5, 1), "{s:?}");
    assert_eq!(s.not_activated_by_kind, vec![("input".to_string(), 1)]);
    assert_eq!(s.fcts_per_fault_max, 1, "a: main alone (main->call is normal-like)");
    assert_eq!(s.phases_median, Phases { restart_ms: 1, inject_ms: 2, load_ms: 3, collect_ms: 4 });
    // a's valid training runs all crashed (its eval run does not count); b's did nothing; none
    // answered with errors, so plan order decides.
    let most = |m| db.fault_most_manifesting("redis", m).unwrap();
    assert_eq!(most(Manifestation::Crash), Some(("call".to_string(), "crash".to_string())));
    assert_eq!(most(Manifestation::Nothing), Some(("call".to_string(), "input:0:3".to_string())));
    assert_eq!(most(Manifestation::Errors), Some(("call".to_string(), "crash".to_string())));
}

#[test]
fn export_import_round_trip_and_idempotence() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, a, _) = setup(dir.path());
    db.set_settings(
        t,
        &Settings {
            scope: "top:5".into(),
            seed: 1,
            cap: 2,
            eval_runs: 1,
            normal_runs: 2,
            window_ms: 1000,
            rate: 100.0,
            items: 200,
        },
    )
    .unwrap();
    let normal = run(Role::Train, RunStatus::Ok, Manifestation::Normal);
    db.record_run(t, None, &normal, &[tree(&["main", "call"], false, 1)], Done::No).unwrap();
    let crash = Run { fates: crash_fates(), ..run(Role::Train, RunStatus::Ok, Manifestation::Crash) };
    let r = db
        .record_run(t, Some(a), &crash, &[tree(&["main"], true, 1), tree(&["main", "call"], true, 2)], Done::Yes)
        .unwrap();
    assert_eq!(db.run_fates(r.run_id).unwrap(), crash_fates(), "fates are stored as given");
    let served = crash_fates()[0].to_proto();
    assert_eq!(RunFate::new(0, &served), Some(crash_fates()[0].clone()), "and read back from the wire type");
    let out = dir.path().join("export.jsonl");
    let n = db.export(&out).unwrap();
    let mut other = Fddb::open(&dir.path().join("g.sqlite")).unwrap();
    assert_eq!(other.import(&out).unwrap(), n);
    assert_eq!(other.export_lines().unwrap(), db.export_lines().unwrap());
    other.import(&out).unwrap();
    assert_eq!(other.export_lines().unwrap(), db.export_lines().unwrap(), "import is idempotent");
    std::fs::write(
        &out,
        "{\"type\":\"fault\",\"target\":\"nope\",\"function\":\"f\",\"fault\":\"crash\",\"done\":false}\n",
    )
    .unwrap();
    assert!(matches!(other.import(&out), Err(FddbError::Import(1, _))));
    std::fs::write(
        &out,
        "{\"type\":\"fault\",\"target\":\"redis\",\"function\":\"call\",\"fault\":\"crash:9\",\"done\":false}\n",
    )
    .unwrap();
    assert!(matches!(other.import(&out), Err(FddbError::Import(1, _))), "a bad fault spec is refused");
}

#[test]
fn dataset_labels_colors_against_a_plan_and_refuses_untraced_points() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, a, _) = setup(dir.path());
    let normal = run(Role::Train, RunStatus::Ok, Manifestation::Normal);
    db.record_run(t, None, &normal, &[tree(&["main", "call", "leaf"], false, 1)], Done::No).unwrap();
    let crash = run(Role::Train, RunStatus::Ok, Manifestation::Crash);
    db.record_run(t, Some(a), &crash, &[tree(&["main", "call"], true, 1), tree(&["main"], false, 2)], Done::Yes)
        .unwrap();
    let eval = run(Role::Eval, RunStatus::Ok, Manifestation::Crash);
    db.record_run(t, Some(a), &eval, &[tree(&["main", "call"], true, 1)], Done::No).unwrap();
    let dropped = run(Role::Eval, RunStatus::Dropped, Manifestation::Crash);
    db.record_run(t, Some(a), &dropped, &[tree(&["main", "other"], true, 1)], Done::No).unwrap();

    let lines = |opts: DatasetOptions| -> Vec<serde_json::Value> {
        let mut buf = Vec::new();
        db.dataset("redis", &opts, &mut buf).unwrap();
        String::from_utf8(buf).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let all = lines(DatasetOptions::default());
    assert_eq!(all.len(), 4, "the dropped run is left out");
    let train = lines(DatasetOptions { role: Some(Role::Train), plan: None });
    assert_eq!(train.len(), 3);
    assert!(train.iter().all(|l| l["role"] == "train"));
    let faulty: Vec<&serde_json::Value> = train.iter().filter(|l| l["label"] != "normal").collect();
    assert_eq!(faulty.len(), 1, "only the thread the fault reached");
    assert_eq!(faulty[0]["label"]["function"], "call");
    assert_eq!(faulty[0]["label"]["kind"], "crash");
    assert_eq!(faulty[0]["nodes"][1]["parent"], 0);

    // Plan {leaf}: main and call turn blue above it, the rest is masked.
    let plan: afetm_proto::plan::PlanFile = serde_json::from_value(serde_json::json!({
        "target": {"path": "/bin/m"}, "points": [{"function": "leaf", "mode": "callstack"}]
    }))
    .unwrap();
    let colored = lines(DatasetOptions { role: Some(Role::Train), plan: Some(plan) });
    assert_eq!(colored.len(), 1, "trees without leaf mask to nothing");
    let colors: Vec<&str> =
        colored[0]["nodes"].as_array().unwrap().iter().map(|n| n["color"].as_str().unwrap()).collect();
    assert_eq!(colors, vec!["blue", "blue", "white"]);
    let outside: afetm_proto::plan::PlanFile = serde_json::from_value(serde_json::json!({
        "target": {"path": "/bin/m"}, "points": [{"function": "nowhere", "mode": "event"}]
    }))
    .unwrap();
    let err = db.dataset("redis", &DatasetOptions { role: None, plan: Some(outside) }, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
}

#[test]
fn another_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("old.sqlite");
    let c = Connection::open(&p).unwrap();
    c.execute_batch("CREATE TABLE runs (id INTEGER PRIMARY KEY);").unwrap();
    drop(c);
    assert!(matches!(Fddb::open(&p), Err(FddbError::Schema { found: 0, .. })));
}

#[test]
fn an_fct_is_found_by_a_hash_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, _, _) = setup(dir.path());
    let normal = run(Role::Train, RunStatus::Ok, Manifestation::Normal);
    let trees = [tree(&["main", "call"], false, 1), tree(&["main", "leaf", "other"], false, 2)];
    db.record_run(t, None, &normal, &trees, Done::No).unwrap();
    for lt in &trees {
        let hash = lt.forest.hash(&lt.table);
        let found = db.fct("redis", &hash[..8].to_uppercase()).unwrap().expect("found by its prefix");
        assert_eq!(found, lt.forest.to_proto(&lt.table));
    }
    let absent = (0..16u8)
        .map(|d| format!("{d:x}").repeat(6))
        .find(|p| trees.iter().all(|lt| !lt.forest.hash(&lt.table).starts_with(p.as_str())))
        .unwrap();
    assert_eq!(db.fct("redis", &absent).unwrap(), None);
    assert!(db.fct("other-target", &trees[0].forest.hash(&trees[0].table)).unwrap().is_none());
    assert!(matches!(db.fct("redis", "abc"), Err(FddbError::Lookup(_))), "too short");
    assert!(matches!(db.fct("redis", "zzzzzz"), Err(FddbError::Lookup(_))), "not hex");
}

/// The version 2 schema as stop 21 wrote it (before held-out faults and window ends).
const SCHEMA_2_RUN_TREES: &str = "
CREATE TABLE targets (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, module TEXT NOT NULL, settings TEXT);
CREATE TABLE functions (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL, name TEXT NOT NULL, params INTEGER,
  returns_value INTEGER, calls_per_sec REAL NOT NULL DEFAULT 0, UNIQUE(target_id, name));
CREATE TABLE faults (id INTEGER PRIMARY KEY, function_id INTEGER NOT NULL, kind TEXT NOT NULL, spec TEXT NOT NULL,
  done INTEGER NOT NULL DEFAULT 0, UNIQUE(function_id, spec));
CREATE TABLE runs (id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL, fault_id INTEGER, role TEXT NOT NULL,
  attempt INTEGER NOT NULL, status TEXT NOT NULL, manifestation TEXT NOT NULL, requests INTEGER NOT NULL,
  errors INTEGER NOT NULL, mean_latency_us REAL NOT NULL, applied INTEGER NOT NULL, kernel_drops INTEGER NOT NULL,
  queue_drops INTEGER NOT NULL, restart_ms INTEGER NOT NULL, inject_ms INTEGER NOT NULL, load_ms INTEGER NOT NULL,
  collect_ms INTEGER NOT NULL, wall_ms INTEGER NOT NULL, new_fcts INTEGER NOT NULL);
CREATE TABLE run_trees (run_id INTEGER NOT NULL, fct_id INTEGER NOT NULL, pid INTEGER NOT NULL, tid INTEGER NOT NULL,
  start_ns INTEGER NOT NULL, faulty INTEGER NOT NULL, normal_like INTEGER NOT NULL, PRIMARY KEY (run_id, pid, tid, start_ns));
INSERT INTO targets(name, module) VALUES ('redis', 'm');
INSERT INTO functions(target_id, name) VALUES (1, 'call');
INSERT INTO faults(function_id, kind, spec) VALUES (1, 'crash', 'crash');
PRAGMA user_version = 2;
";

#[test]
fn a_version_2_fddb_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.sqlite");
    Connection::open(&p).unwrap().execute_batch(SCHEMA_2_RUN_TREES).unwrap();
    let db = Fddb::open(&p).unwrap();
    let v: i64 = db.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let held: Option<String> = db.conn.query_row("SELECT held_out FROM faults", [], |r| r.get(0)).unwrap();
    assert_eq!(held, None, "an old fault is a training fault");
    db.conn.query_row("SELECT COUNT(end_ns) FROM run_trees", [], |r| r.get::<_, i64>(0)).unwrap();
    db.conn.query_row("SELECT COUNT(*) FROM run_fates", [], |r| r.get::<_, i64>(0)).unwrap();
    drop(db);
    Fddb::open(&p).expect("an upgraded FDDB opens again");
}

#[test]
fn a_version_3_fddb_gets_fates_and_keeps_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, a, _) = setup(dir.path());
    let crash = run(Role::Train, RunStatus::Ok, Manifestation::Crash);
    let r = db.record_run(t, Some(a), &crash, &[tree(&["main"], true, 1)], Done::No).unwrap();
    db.conn
        .execute_batch(
            "DROP TABLE run_fates; ALTER TABLE runs DROP COLUMN start; ALTER TABLE run_trees DROP COLUMN calls;
             PRAGMA user_version = 3;",
        )
        .unwrap();
    drop(db);
    let mut db = Fddb::open(&dir.path().join("f.sqlite")).expect("a version 3 FDDB is upgraded");
    let v: i64 = db.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    assert_eq!(db.run_fates(r.run_id).unwrap(), Vec::new(), "runs recorded before have no fates");
    let again = Run { fates: crash_fates(), ..crash };
    let r = db.record_run(t, Some(a), &again, &[tree(&["main"], true, 1)], Done::No).unwrap();
    assert_eq!(db.run_fates(r.run_id).unwrap().len(), 2);
}

#[test]
fn a_version_5_fddb_reads_its_fates_without_a_stack_and_records_new_ones_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, _, a) = setup(dir.path());
    let crash = Run { fates: crash_fates(), ..run(Role::Train, RunStatus::Ok, Manifestation::Crash) };
    let old = db.record_run(t, Some(a), &crash, &[tree(&["main"], true, 1)], Done::No).unwrap();
    let stacks: Vec<Vec<String>> = db.run_fates(old.run_id).unwrap().into_iter().map(|f| f.stack).collect();
    assert_eq!(stacks[0], ["libc.so.6:memcpy", "m:call", "m:main"], "stored as given");
    assert!(stacks[1].is_empty());
    let lines = db.export_lines().unwrap();
    assert!(lines.iter().any(|l| l.contains("\"stack\":[\"libc.so.6:memcpy\"")), "exports carry the stack");
    db.conn.execute_batch("ALTER TABLE run_fates DROP COLUMN stack; ALTER TABLE run_trees DROP COLUMN calls; PRAGMA user_version = 5;").unwrap();
    drop(db);
    let mut db = Fddb::open(&dir.path().join("f.sqlite")).expect("a version 5 FDDB is upgraded");
    let v: i64 = db.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    assert!(db.run_fates(old.run_id).unwrap().iter().all(|f| f.stack.is_empty()), "old fates: no stack");
    let new = db.record_run(t, Some(a), &crash, &[tree(&["main"], true, 1)], Done::No).unwrap();
    assert_eq!(db.run_fates(new.run_id).unwrap()[0].stack.len(), 3);
    // An export line of schema 5 (no stack) imports with empty stacks.
    let mut again = Fddb::open(&dir.path().join("g.sqlite")).unwrap();
    let old_style: Vec<String> = lines.iter().map(|l| l.replace(",\"stack\":[]", "")).collect();
    again.import_from(std::io::Cursor::new(old_style.join("\n")), "old.jsonl").unwrap();
}

#[test]
fn a_version_4_fddb_reads_its_runs_as_warm_and_records_cold_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, _, _) = setup(dir.path());
    let normal = run(Role::Eval, RunStatus::Ok, Manifestation::Normal);
    db.record_run(t, None, &normal, &[tree(&["main"], false, 1)], Done::No).unwrap();
    db.conn
        .execute_batch(
            "ALTER TABLE runs DROP COLUMN start; ALTER TABLE run_fates DROP COLUMN stack;
             ALTER TABLE run_trees DROP COLUMN calls; PRAGMA user_version = 4;",
        )
        .unwrap();
    drop(db);
    let mut db = Fddb::open(&dir.path().join("f.sqlite")).expect("a version 4 FDDB is upgraded");
    let v: i64 = db.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let cold = Run { start: Start::Cold, ..normal };
    db.record_run(t, None, &cold, &[tree(&["main"], false, 1)], Done::No).unwrap();
    let starts: Vec<Start> = db.valid_runs("redis", Role::Eval).unwrap().iter().map(|r| r.start).collect();
    assert_eq!(starts, vec![Start::Warm, Start::Cold], "the old run was warm, the new one cold");
    // Export and import keep it; an export line without the field (schema 4) reads as warm.
    let lines = db.export_lines().unwrap();
    assert_eq!(lines.iter().filter(|l| l.contains("\"start\":\"cold\"")).count(), 1);
    let mut again = Fddb::open(&dir.path().join("g.sqlite")).unwrap();
    let old_style: Vec<String> = lines.iter().map(|l| l.replace(",\"start\":\"warm\"", "")).collect();
    again.import_from(std::io::Cursor::new(old_style.join("\n")), "old.jsonl").unwrap();
    let starts: Vec<Start> = again.valid_runs("redis", Role::Eval).unwrap().iter().map(|r| r.start).collect();
    assert_eq!(starts, vec![Start::Warm, Start::Cold]);
}

#[test]
fn a_stored_fate_of_unknown_kind_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, a, _) = setup(dir.path());
    let crash = Run { fates: crash_fates(), ..run(Role::Train, RunStatus::Ok, Manifestation::Crash) };
    let r = db.record_run(t, Some(a), &crash, &[tree(&["main"], true, 1)], Done::No).unwrap();
    db.conn.execute("UPDATE run_fates SET kind = 'vanished' WHERE tid = 2", []).unwrap();
    assert!(matches!(db.run_fates(r.run_id), Err(FddbError::Stored(m)) if m.contains("vanished")));
}

#[test]
fn held_out_faults_get_no_training_and_survive_export() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, a, _) = setup(dir.path());
    let f: i64 = db.conn.query_row("SELECT id FROM functions WHERE name = 'call'", [], |r| r.get(0)).unwrap();
    let spec = db.held_out_fault(f, Fault::Input { arg: 0, bit: 9 }, HeldOut::Spec).unwrap();
    // A spec that is already a training fault stays one.
    let crash = db.held_out_fault(f, Fault::Crash, HeldOut::Function).unwrap();
    assert_eq!(crash, a);
    let pending = db.pending(t, 1).unwrap();
    let p = pending.iter().find(|p| p.id == spec).unwrap();
    assert!(p.done, "held out: done before any training run");
    let eval = run(Role::Eval, RunStatus::Ok, Manifestation::Errors);
    let mut lead = tree(&["main", "call"], false, 2);
    lead.end_ns = 4; // before the first application (5)
    db.record_run(t, Some(spec), &eval, &[lead, tree(&["main"], true, 1)], Done::No).unwrap();
    db.record_run(t, Some(a), &run(Role::Eval, RunStatus::NotActivated, Manifestation::Nothing), &[], Done::No)
        .unwrap();
    db.record_run(t, None, &run(Role::Eval, RunStatus::Dropped, Manifestation::Normal), &[], Done::No).unwrap();
    let runs = db.valid_runs("redis", Role::Eval).unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].held_out, Some(HeldOut::Spec));
    assert_eq!(db.run_applications(runs[0].id).unwrap()[0].first_ns, 5);
    let c = db.run_counts("redis", Role::Eval).unwrap();
    assert_eq!(c, RunCounts { fault_ok: 1, fault_not_activated: 1, fault_dropped: 0, normal_ok: 0, normal_dropped: 1 });
    let mut ends = Vec::new();
    db.for_each_tree("redis", &DatasetOptions::default(), |r| {
        ends.push(r.end_ns);
        Ok(())
    })
    .unwrap();
    assert_eq!(ends, vec![Some(1_000_000_000), Some(4)], "by thread: 1, then the lead's 2");
    let out = dir.path().join("export.jsonl");
    db.export(&out).unwrap();
    let mut other = Fddb::open(&dir.path().join("g.sqlite")).unwrap();
    other.import(&out).unwrap();
    assert_eq!(other.export_lines().unwrap(), db.export_lines().unwrap());
    assert_eq!(other.valid_runs("redis", Role::Eval).unwrap()[0].held_out, Some(HeldOut::Spec));
}

#[test]
fn a_real_export_imports_with_and_without_fates() {
    // The fuzz seed: cut from a real campaign export; its crash run carries a fate, its hang
    // run none (as lines of schema 3 do).
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/fddb_import/runs.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let mut db = Fddb::open(&dir.path().join("f.sqlite")).unwrap();
    assert!(db.import(&seed).unwrap() > 0);
    let lines = db.export_lines().unwrap();
    let with_fates: Vec<_> = lines.iter().filter(|l| l.contains("\"kind\":\"killed\"")).collect();
    assert_eq!(with_fates.len(), 1, "one run line carries the crash's fate: {lines:?}");
    assert!(with_fates[0].contains("redis-server:zmalloc"), "with its last calls");
}

#[test]
fn settings_stored_before_the_shop_items_read_as_fifty() {
    // A target's settings as campaigns stored them before `items`: their shop held 50 items.
    let old = r#"{"scope":"top:5","seed":1,"cap":2,"eval_runs":1,"normal_runs":2,"window_ms":1000,"rate":100.0}"#;
    let s: Settings = serde_json::from_str(old).unwrap();
    assert_eq!(s.items, 50);
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, _, _) = setup(dir.path());
    db.set_settings(t, &Settings { items: 200, ..s }).unwrap();
    assert_eq!(db.settings(t).unwrap().unwrap().items, 200);
}

#[test]
fn windows_of_one_shape_keep_their_own_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut db, t, _, _) = setup(dir.path());
    let with_calls = |c: u64, start_ns: u64| {
        let mut w = tree(&["main", "call", "leaf"], false, 1);
        w.forest.nodes[2].calls = c;
        LabelledTree { start_ns, ..w }
    };
    let normal = run(Role::Train, RunStatus::Ok, Manifestation::Normal);
    db.record_run(t, None, &normal, &[with_calls(4, 0), with_calls(9, 1)], Done::No).unwrap();
    db.record_run(t, None, &normal, &[with_calls(40, 0)], Done::No).unwrap();
    let fcts: i64 = db.conn.query_row("SELECT COUNT(*) FROM fcts", [], |r| r.get(0)).unwrap();
    assert_eq!(fcts, 1, "one structure, stored once");
    let mut leaf_calls = Vec::new();
    db.for_each_tree("redis", &DatasetOptions::default(), |row| {
        leaf_calls.push(row.forest.nodes.iter().find(|n| &*row.table.get(n.func).name == "leaf").unwrap().calls);
        Ok(())
    })
    .unwrap();
    assert_eq!(leaf_calls, vec![4, 9, 40], "each window reads its own calls, not its structure's first");
    // Rows recorded before schema 7 have no calls of their own: they read their FCT's.
    db.conn.execute("UPDATE run_trees SET calls = NULL", []).unwrap();
    leaf_calls.clear();
    db.for_each_tree("redis", &DatasetOptions::default(), |row| {
        leaf_calls.push(row.forest.nodes.iter().find(|n| &*row.table.get(n.func).name == "leaf").unwrap().calls);
        Ok(())
    })
    .unwrap();
    assert_eq!(leaf_calls, vec![4, 4, 4]);
    // A stored vector that does not fit its tree is an error, not a silent mix.
    db.conn.execute("UPDATE run_trees SET calls = ?1", [encode_calls(&[1, 2])]).unwrap();
    let err = db.for_each_tree("redis", &DatasetOptions::default(), |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("2 calls for a tree of 3 nodes"), "{err}");
}
