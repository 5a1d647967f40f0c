//! A small real campaign: zmalloc of the source-built redis-server under the shop workload, all
//! five fault types, cap 2, one evaluation run per fault, real agent (full trace) and injector.
//! It is killed (SIGKILL) after its second fault and resumed. Checked: every fault ends with its
//! runs and nothing twice; the stored FCTs of fault runs are full traces (white nodes of many
//! functions outside the scope); every fault run applied its fault and lost no event; trees are
//! labelled per thread; evaluation runs are apart from training runs in the dataset. Root only.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_fddb::{Fddb, Role, dataset::DatasetOptions};

fn bin_dir() -> PathBuf {
    std::env::var_os("AFETM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_afetm-campaign")).parent().unwrap().to_path_buf())
}

fn campaign(dir: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afetm-campaign"));
    c.args(["redis", "--scope", "functions:zmalloc", "--db"])
        .arg(dir.join("fddb.sqlite"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .args(["--base-port", &port.to_string()])
        .args(["--window", "1s", "--cap", "2", "--eval-runs", "1", "--normal-runs", "1", "--sample", "2s"])
        .args(["--rate", "200"]);
    c
}

fn export(db: &Path) -> Vec<serde_json::Value> {
    let f = Fddb::open(db).unwrap();
    f.export_lines().unwrap().iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Runs per (fault, role).
fn runs(lines: &[serde_json::Value]) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for r in lines.iter().filter(|v| v["type"] == "run" && !v["fault"].is_null()) {
        *out.entry((r["fault"].as_str().unwrap().to_string(), r["role"].as_str().unwrap().to_string())).or_default() +=
            1;
    }
    out
}

fn faults_done(db: &Path) -> usize {
    if !db.exists() {
        return 0;
    }
    export(db).iter().filter(|v| v["type"] == "fault" && v["done"] == true).count()
}

fn dataset(db: &Path, role: Option<Role>) -> Vec<serde_json::Value> {
    let mut buf = Vec::new();
    Fddb::open(db).unwrap().dataset("redis", &DatasetOptions { role, plan: None }, &mut buf).unwrap();
    String::from_utf8(buf).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn small_redis_campaign_full_traces_honest_labels_resumable() {
    if testbed::skip::needs_root("starting the testbed and injecting faults") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fddb.sqlite");
    let mut child = campaign(dir.path(), 27080).spawn().unwrap();
    let t = Instant::now();
    while faults_done(&db) < 2 {
        assert!(child.try_wait().unwrap().is_none(), "the campaign ended before it could be interrupted");
        assert!(t.elapsed() < Duration::from_secs(300), "no progress");
        sleep(Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL: no cleanup in the runner
    child.wait().unwrap();
    let before = runs(&export(&db));
    let out = campaign(dir.path(), 27080).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = export(&db);
    let after = runs(&lines);

    // Every fault: done, 1-2 training runs, exactly one evaluation run; nothing repeated.
    let faults: Vec<&serde_json::Value> = lines.iter().filter(|v| v["type"] == "fault").collect();
    let kinds: BTreeSet<String> = faults
        .iter()
        .map(|f| f["fault"].as_str().unwrap().split(':').next().unwrap().replace(char::is_numeric, ""))
        .collect();
    assert_eq!(kinds.len(), 5, "all five fault types: {kinds:?}");
    for f in &faults {
        let spec = f["fault"].as_str().unwrap().to_string();
        assert_eq!(f["done"], true, "{spec}");
        let train = after.get(&(spec.clone(), "train".into())).copied().unwrap_or(0);
        if f["held_out"].is_null() {
            assert!((1..=2).contains(&train), "{spec}: {train} training runs");
        } else {
            assert_eq!(train, 0, "{spec} is held out of training ({})", f["held_out"]);
        }
        assert_eq!(after.get(&(spec.clone(), "eval".into())).copied(), Some(1), "{spec}");
    }
    // Unseen specs: every parameterised training fault has a held-out sibling of its kind
    // (one function in scope: none is held out whole).
    let held: Vec<&str> =
        faults.iter().filter(|f| f["held_out"] == "spec").map(|f| f["fault"].as_str().unwrap()).collect();
    let trained: Vec<&str> =
        faults.iter().filter(|f| f["held_out"].is_null()).map(|f| f["fault"].as_str().unwrap()).collect();
    let param = trained.iter().filter(|s| !["crash", "deadlock"].contains(s)).count();
    assert_eq!(held.len(), param, "held out {held:?}, trained {trained:?}");
    assert!(held.iter().all(|h| !trained.contains(h)));
    assert!(faults.iter().all(|f| f["held_out"] != "function"));
    for (k, n) in &before {
        let done_before = before.contains_key(&(k.0.clone(), "eval".into()));
        if done_before {
            assert_eq!(after.get(k), Some(n), "{k:?} was finished before the kill and not run again");
        }
    }

    // Fault runs: nothing lost; a run stored as a valid fault run applied its fault (and says
    // where and when); one that applied nothing is stored as not activated.
    let fault_runs: Vec<&serde_json::Value> =
        lines.iter().filter(|v| v["type"] == "run" && !v["fault"].is_null() && v["status"] == "ok").collect();
    for r in lines.iter().filter(|v| v["type"] == "run") {
        assert_eq!((r["kernel_drops"].as_u64(), r["queue_drops"].as_u64()), (Some(0), Some(0)), "{}", r["fault"]);
        let applied = r["applied"].as_u64().unwrap();
        match r["status"].as_str().unwrap() {
            "ok" if !r["fault"].is_null() => {
                assert!(applied > 0, "{}", r["fault"]);
                assert!(!r["applications"].as_array().unwrap().is_empty(), "{}: where and when", r["fault"]);
            }
            "ok" => assert_eq!(applied, 0, "a normal run"),
            "not_activated" => assert_eq!(applied, 0, "{}", r["fault"]),
            other => panic!("{}: status {other}", r["fault"]),
        }
    }
    assert!(fault_runs.len() >= 10, "zmalloc is called all the time: {} valid fault runs", fault_runs.len());
    let crash = fault_runs.iter().find(|r| r["fault"] == "crash").unwrap();
    assert_eq!(crash["manifestation"], "crash");
    // The crash's fate is stored: SIGKILL (the injector's), and the thread that called zmalloc
    // has it as its last call (the injection fires where the tracer probes the function).
    let fates = crash["fates"].as_array().unwrap();
    assert!(fates.iter().all(|f| f["kind"] == "killed" && f["code"] == 9), "{fates:?}");
    let last = |f: &serde_json::Value| f["last_calls"].as_array().unwrap().last().cloned();
    assert!(fates.iter().any(|f| last(f) == Some("redis-server:zmalloc".into())), "{fates:?}");
    let deadlock = fault_runs.iter().find(|r| r["fault"] == "deadlock").unwrap();
    assert_eq!(deadlock["manifestation"], "hang");

    // Full traces: white nodes of many functions outside the scope in the fault runs' trees.
    let all = dataset(&db, None);
    let white: BTreeSet<&str> = all
        .iter()
        .filter(|l| l["label"] != "normal")
        .flat_map(|l| l["nodes"].as_array().unwrap())
        .filter(|n| n["color"] == "white" && n["function"] != "zmalloc")
        .map(|n| n["function"].as_str().unwrap())
        .collect();
    assert!(white.len() >= 30, "{} white functions outside the scope: {white:?}", white.len());
    // Labels per thread: a fault run holds normal trees too (threads the fault never reached).
    let faulty = all.iter().filter(|l| l["label"] != "normal").count();
    assert!(faulty > 0 && faulty < all.len(), "{faulty} of {}", all.len());
    assert!(all.iter().filter(|l| l["label"] != "normal").all(|l| l["label"]["function"] == "zmalloc"));

    // Evaluation runs exist and are apart from training runs.
    let train = dataset(&db, Some(Role::Train));
    let eval = dataset(&db, Some(Role::Eval));
    assert!(eval.iter().any(|l| l["label"] != "normal"), "faulty evaluation trees");
    let ids = |v: &[serde_json::Value]| v.iter().map(|l| l["run"].as_i64().unwrap()).collect::<BTreeSet<_>>();
    assert!(ids(&train).is_disjoint(&ids(&eval)));
    assert!(train.iter().all(|l| l["role"] == "train") && eval.iter().all(|l| l["role"] == "eval"));
    assert_eq!(train.len() + eval.len(), all.len());
}
