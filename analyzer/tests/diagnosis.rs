//! Diagnosis end to end on the real shop, and the daemon's answers to bad models and trees.
//!
//! The end-to-end test runs a small real campaign on the source-built redis (`addReplyBulk`
//! and `delGenericCommand`,
//! every fault type), trains the GCN under the campaign's plan (every function, event mode:
//! the test's plan, so that it fits the test's time; the demo and the evaluation use a P = 10%
//! selection), serves the model, traces the shop's redis with an agent running that plan, and
//! checks: every window of a normal run and after is diagnosed, stored and streamed on
//! WatchDiagnoses; a plan change marks the diagnoses stale until the model retrained from the
//! FDDB for the new plan (under 60 s) takes over; then a fault of the campaign (the one whose
//! training runs most often made the shop answer with errors) is injected while the shop runs:
//! a fresh injection training never saw, whose windows are diagnosed by the new model.
//! Whether the normal run alarms and whether the diagnosis names the fault are printed, not
//! asserted: with a campaign this small neither is reliable (README, "Diagnosis: what the
//! numbers say"). Root only.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use afetm_calltree::graph::NamedGraph;
use afetm_diagnosis::{
    Class,
    model::PlanKey,
    train::{Sample, Target, TrainConfig, train},
};
use afetm_fault::FaultKind;
use afetm_proto::{self as pb, query_client::QueryClient};
use common::{Down, Kill, agent, bin, connect, run_ok};

mod common;

fn serve(dir: &Path, port: u16, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_afetm-analyzer"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--window", "1s", "--db"])
        .arg(dir.join("live.sqlite"))
        .args(extra)
        .stderr(std::fs::File::create(dir.join(format!("analyzer-{port}.log"))).unwrap())
        .spawn()
        .unwrap()
}

fn tree(nodes: &[(&str, i32)]) -> pb::Tree {
    pb::Tree {
        nodes: nodes
            .iter()
            .map(|(f, p)| pb::TreeNode {
                function: f.to_string(),
                module: "m".into(),
                color: pb::Color::White as i32,
                parent: *p,
                children: vec![],
                calls: 1,
            })
            .collect(),
        truncated: false,
    }
}

/// A small model for module `m`: trees with an extra `bad` child under `root` are the fault.
fn small_model(dir: &Path) -> PathBuf {
    let fault = Class::Fault { function: "bad".into(), kind: FaultKind::Crash };
    let samples: Vec<Sample> = (0..40)
        .map(|i| {
            let (t, class) = if i % 2 == 0 {
                (tree(&[("root", -1), ("a", 0), ("b", 0)]), Class::Normal)
            } else {
                (tree(&[("root", -1), ("a", 0), ("bad", 0)]), fault.clone())
            };
            Sample { graph: NamedGraph::from_tree(&t).unwrap(), class: class.clone(), run: i, run_class: class }
        })
        .collect();
    let target = Target { name: "small".into(), module: "m".into(), plan: PlanKey::default(), window_ms: 1000 };
    let model = train(&samples, target, &TrainConfig { epochs: 30, ..Default::default() }, |_| {}).unwrap();
    let out = dir.join("small-model");
    model.save(&out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_models_and_trees_get_clear_errors_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_model(dir.path());

    // A corrupt weights file: the daemon refuses to start and says which file.
    let corrupt = dir.path().join("corrupt-model");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::copy(good.join("manifest.json"), corrupt.join("manifest.json")).unwrap();
    std::fs::write(corrupt.join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_afetm-analyzer"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("x.sqlite"))
        .arg("--model")
        .arg(&corrupt)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model weights") && err.contains("corrupt-model"), "{err}");
    // Two models for the same module: refused, naming both.
    let out = Command::new(env!("CARGO_BIN_EXE_afetm-analyzer"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path().join("x.sqlite"))
        .arg("--model")
        .arg(&good)
        .arg("--model")
        .arg(&good)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("both for module \"m\""), "{err}");

    let port = 27431;
    let mut child = serve(dir.path(), port, &["--model", good.to_str().unwrap()]);
    let mut q = connect(port, &mut child).await;
    let _kill = Kill(vec![child]);
    // A malformed tree (a parent after its child).
    let bad = pb::Tree { nodes: tree(&[("root", 1), ("a", -1)]).nodes, truncated: false };
    let e = q.diagnose(pb::DiagnoseRequest { model: String::new(), tree: Some(bad), top_k: 0 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("malformed tree"), "{e}");
    // A model for another target.
    let req = pb::DiagnoseRequest { model: "redis".into(), tree: Some(tree(&[("root", -1)])), top_k: 0 };
    let e = q.diagnose(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("no model for target \"redis\""), "{e}");
    // Still serving: the faulty tree is diagnosed as the fault, the normal one is not.
    let faulty = tree(&[("root", -1), ("a", 0), ("bad", 0)]);
    let d = q
        .diagnose(pb::DiagnoseRequest { model: "small".into(), tree: Some(faulty), top_k: 2 })
        .await
        .unwrap()
        .into_inner();
    assert!(d.error, "{d:?}");
    assert_eq!(d.top[0].function, "bad");
    assert_eq!(d.top.len(), 1, "only one fault class exists");
    let normal = tree(&[("root", -1), ("a", 0), ("b", 0)]);
    let d = q
        .diagnose(pb::DiagnoseRequest { model: String::new(), tree: Some(normal), top_k: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(!d.error, "{d:?}");
}

/// The fate rule as the daemon applies it (`serve --fate-rule`): a thread that died of SIGSEGV
/// after `root → a`, whose AFCT the model reads as `bad`'s fault. The window alarms under
/// every rule; the fate names `a`, the GCN `bad`, the merge both.
#[test]
fn a_killed_threads_suspects_follow_the_fate_rule() {
    let dir = tempfile::tempdir().unwrap();
    let dir_model = small_model(dir.path());
    let model = afetm_diagnosis::Model::load(&dir_model).unwrap();
    let killed = pb::ThreadFate {
        pid: 9,
        tid: 9,
        kind: pb::FateKind::Killed as i32,
        code: 11,
        took_signal: true,
        last_calls: vec!["m:root".into(), "m:a".into()],
        ..Default::default()
    };
    let faulty = tree(&[("root", -1), ("a", 0), ("bad", 0)]);
    let w = afetm_analyzer::store::WindowTrees {
        id: 1,
        agent_id: "a".into(),
        pid: 9,
        start_ns: 0,
        end_ns: 1_000_000_000,
        trees: vec![(9, faulty.clone())],
        graphs: vec![(9, NamedGraph::from_tree(&faulty).unwrap())],
        fates: vec![killed],
    };
    let by = |rule: &str| {
        let d = afetm_analyzer::diagnoser::Diagnoser::load(std::slice::from_ref(&dir_model), None, 3, 1000)
            .unwrap()
            .with_fate_rule(rule.parse().unwrap());
        let (tid, d, threads) = d.diagnose_window(&model, &w).expect("a verdict");
        assert_eq!((tid, threads, d.error, d.p_normal), (9, 1, true, 0.0), "{rule}: {d:?}");
        d.top.iter().map(|s| (s.function.clone(), s.kind)).collect::<Vec<_>>()
    };
    let crash = |f: &str| (f.to_string(), FaultKind::Crash);
    assert_eq!(by("fate"), [crash("a"), crash("root")]);
    assert_eq!(by("gcn"), [crash("bad")], "the model's only fault class");
    let merged = by("merge");
    assert!(merged.contains(&crash("bad")) && merged.contains(&crash("a")), "{merged:?}");
    // Per fate class: a SIGSEGV is a `signal` fate.
    assert_eq!(by("signal=gcn"), [crash("bad")]);
    assert_eq!(by("kill=gcn,stop=merge"), [crash("a"), crash("root")]);
    // The model's fault functions rank first among the last calls: `bad`, called before `a`.
    let mut w = w;
    w.fates[0].last_calls = vec!["m:root".into(), "m:bad".into(), "m:a".into()];
    let d = afetm_analyzer::diagnoser::Diagnoser::load(std::slice::from_ref(&dir_model), None, 3, 1000).unwrap();
    let (_, d, _) = d.diagnose_window(&model, &w).expect("a verdict");
    let top: Vec<_> = d.top.iter().map(|s| (s.function.clone(), s.kind)).collect();
    assert_eq!(top, [crash("bad"), crash("a"), crash("root")]);
    // Without a model (an agent no model serves) by recency alone.
    let d = afetm_analyzer::diagnoser::Diagnoser::load(std::slice::from_ref(&dir_model), None, 3, 1000).unwrap();
    let (_, alone, _) = d.diagnose_fates(&w).expect("a verdict");
    assert_eq!(alone.top[0].function, "a");
}

const RATE: f64 = 100.0;

fn load(cfg: &testbed::Config, secs: u64) -> testbed::load::Report {
    common::load(cfg, secs, RATE)
}

/// Pushes the agent's plan less `serverCron` and waits (with the shop under load) until the
/// daemon says the retrained model is ready; returns how long that took, in seconds.
async fn retrain_for_a_new_plan(port: u16, redis: &Path, log: &Path, cfg: &testbed::Config) -> f64 {
    let url = format!("http://127.0.0.1:{port}");
    let mut q = QueryClient::connect(url.clone()).await.unwrap();
    let agents = q.list_agents(pb::ListAgentsRequest { without_plans: false }).await.unwrap().into_inner().agents;
    let report = agents.iter().find(|a| a.agent_id == "live" && a.connected).and_then(|a| a.last_plan.clone()).unwrap();
    let points: Vec<pb::TracePoint> = report.points.into_iter().filter(|p| p.function != "serverCron").collect();
    let plan = pb::Plan { version: 2, points, target_path: redis.display().to_string(), target_pid: 0 };
    let mut c = afetm_proto::control_client::ControlClient::connect(url).await.unwrap();
    let t = Instant::now();
    c.set_plan(pb::SetPlanRequest { agent_id: "live".into(), plan: Some(plan) }).await.unwrap();
    // The shop keeps serving meanwhile, so windows close and are diagnosed (stale).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (cfg, halt) = (cfg.clone(), stop.clone());
    let busy = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        // Bounded, so a failed wait below cannot leave it running.
        while !halt.load(std::sync::atomic::Ordering::Relaxed) && t.elapsed() < Duration::from_secs(95) {
            load(&cfg, 1);
        }
    });
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("retrained model for the new plan is ready") {
            break;
        }
        assert!(!text.contains("retraining for the new plan failed"), "{text}");
        assert!(t.elapsed() < Duration::from_secs(90), "no retrained model after 90 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.await.unwrap();
    took
}

/// The fault whose training runs most often made the shop answer with errors while redis kept
/// running (a crashed thread's tree is a normal tree cut short: no call tree names the function
/// that stopped it); plan order breaks ties. Read from training runs only.
fn errors_fault(fddb: &Path) -> (String, String) {
    afetm_fddb::Fddb::open(fddb)
        .unwrap()
        .fault_most_manifesting("redis", afetm_fddb::Manifestation::Errors)
        .unwrap()
        .expect("no fault has a valid training run")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_fault_on_the_real_shop_is_diagnosed_online() {
    if testbed::skip::needs_root("starting the testbed and injecting faults") {
        return;
    }
    let Some(binaries) = testbed::build::binaries(&testbed::build::cache_dir()) else {
        panic!("source builds missing: cargo xtask testbed build");
    };
    let dir = tempfile::tempdir().unwrap();
    let fddb = dir.path().join("fddb.sqlite");
    run_ok(
        Command::new(bin("afetm-campaign"))
            .args(["redis", "--scope", "functions:addReplyBulk,delGenericCommand", "--db"])
            .arg(&fddb)
            .arg("--work-dir")
            .arg(dir.path().join("campaign"))
            .arg("--bin-dir")
            .arg(bin(""))
            .args(["--base-port", "27180", "--cap", "2", "--eval-runs", "0", "--normal-runs", "6", "--sample", "2s"])
            .args(["--rate", &RATE.to_string()]),
    );
    let redis = binaries.redis.clone();
    let (function, fault) = errors_fault(&fddb);
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        serde_json::json!({"target": {"path": redis}, "points": [{"function": "*", "mode": "event"}]}).to_string(),
    )
    .unwrap();
    let model = dir.path().join("model");
    let trained = run_ok(
        Command::new(env!("CARGO_BIN_EXE_afetm-analyzer"))
            .args(["train", "--target", "redis", "--fddb"])
            .arg(&fddb)
            .arg("--plan")
            .arg(&plan)
            .arg("--out")
            .arg(&model),
    );
    eprintln!("{trained}");

    let mut cfg = testbed::Config::new(dir.path().join("shop"));
    cfg.base_port = 27280;
    cfg.apaches = 1;
    cfg.binaries = binaries;
    let _ = testbed::down(&cfg);
    testbed::up(&cfg).unwrap();
    let _down = Down(cfg.clone());

    let port = 27432;
    let metrics_addr = "127.0.0.1:27433";
    let mut analyzer = serve(
        dir.path(),
        port,
        &[
            "--model",
            model.to_str().unwrap(),
            "--fddb",
            fddb.to_str().unwrap(),
            "--metrics-listen",
            metrics_addr,
            "--http-listen",
            WEB,
        ],
    );
    let mut q = connect(port, &mut analyzer).await;
    let mut procs = Kill(vec![analyzer]);
    let mut watch = q
        .watch_diagnoses(pb::WatchDiagnosesRequest { agent_id: "live".into(), errors_only: false })
        .await
        .unwrap()
        .into_inner();
    procs.0.push(agent(&plan, port, dir.path(), &[]));
    // A normal run, then the fault injected while the shop runs.
    let normal = load(&cfg, 4);
    assert_eq!(normal.errors, 0);
    let normal_end = testbed::monotonic_ns();

    // The plan changes (one function less): the model no longer fits, a new one is trained
    // from the FDDB in the background and replaces it; diagnoses meanwhile are marked stale.
    let log = dir.path().join(format!("analyzer-{port}.log"));
    let retrained = retrain_for_a_new_plan(port, &redis, &log, &cfg).await;
    eprintln!("retraining for the new plan took {retrained:.1} s");
    assert!(retrained < 60.0, "retraining took {retrained:.1} s");
    let pid = testbed::servers(&cfg).unwrap().into_iter().find(|s| s.name.starts_with("redis")).unwrap().pid;
    let injected_at = testbed::monotonic_ns();
    let mut inject = Command::new(bin("afetm-inject"))
        .arg("--module")
        .arg(&redis)
        .args(["--function", &function, "--fault", &fault, "--pid", &pid.to_string(), "--foreign"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _ = load(&cfg, 3);
    let _ = inject.kill();
    let _ = inject.wait();
    // The agent's metrics, while it runs.
    let am = scrape(common::AGENT_METRICS);
    // Stopping the agent closes the last windows.
    let mut agent = procs.0.remove(1);
    let _ = Command::new("kill").args(["-TERM", &agent.id().to_string()]).status();
    let _ = agent.wait();
    let all = q
        .list_diagnoses(pb::ListDiagnosesRequest { agent_id: "live".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .diagnoses;
    let report: Vec<String> = all
        .iter()
        .map(|d| {
            format!(
                "{} [{}..{}] err={} p={:.3} {:?}",
                d.window_id,
                d.start_ns,
                d.end_ns,
                d.error,
                d.p_normal,
                d.top.first().map(|s| (&s.kind, &s.function))
            )
        })
        .collect();
    assert!(all.iter().any(|d| d.stale), "no diagnosis was marked stale while the plan did not fit: {report:#?}");
    assert!(all.iter().filter(|d| d.end_ns > injected_at).all(|d| !d.stale), "stale after the retraining: {report:#?}");
    let before: Vec<&pb::Diagnosis> = all.iter().filter(|d| d.end_ns <= normal_end && d.pid == pid).collect();
    assert!(!before.is_empty(), "no window of the normal run was diagnosed: {report:#?}");
    // Like the fault's, the normal run's verdicts are printed, not asserted: a fresh-clone CI
    // run saw false alarms at P(normal) 0.42, another none; in 4 runs here the normal windows
    // scored 0.32-0.63 (thresholds 0.29 and 0.55 where printed; 2 of 4 windows alarmed in one
    // run). Why: the report test's note (live windows held more commands than the campaign's,
    // since fixed). After that fix, 2 runs without an alarm (normal windows 0.53-0.59), both
    // with t < 0.0001 from validation fault runs that scored 0 (the model alarms only on
    // windows cut short there).
    let false_alarms = before.iter().filter(|d| d.error).count();
    eprintln!("normal run: {false_alarms} of {} windows alarmed", before.len());
    eprintln!("injected {fault}@{function}; diagnoses:\n{report:#?}");
    // Every window after the injection was diagnosed, by the retrained model.
    let after: Vec<&pb::Diagnosis> = all.iter().filter(|d| d.end_ns > injected_at && d.pid == pid).collect();
    assert!(!after.is_empty(), "no window after the injection was diagnosed: {report:#?}");
    // Whether the model saw the fault is reported, not asserted: on a campaign this small it
    // often does not (see README, "Diagnosis: what the numbers say").
    let worst = after.iter().min_by(|a, b| a.p_normal.total_cmp(&b.p_normal)).unwrap();
    eprintln!(
        "after the injection of {fault}@{function}: alarm {}, worst P(normal) {:.3}, injected function in the top-3: {}",
        after.iter().any(|d| d.error),
        worst.p_normal,
        worst.top.iter().take(3).any(|s| s.function == function)
    );
    // The metrics counted every stored diagnosis (more may have come since the listing).
    let m = scrape(metrics_addr);
    let count = |prefix: &str| -> f64 {
        m.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    };
    assert!(count("afetm_analyzer_diagnoses_total{") >= all.len() as f64, "{m}");
    let stale = all.iter().filter(|d| d.stale).count() as f64;
    assert!(
        count("afetm_analyzer_diagnoses_total{verdict=\"normal\",stale=\"true\"}")
            + count("afetm_analyzer_diagnoses_total{verdict=\"error\",stale=\"true\"}")
            >= stale,
        "{m}"
    );
    assert!(count("afetm_analyzer_diagnosis_latency_seconds_count") >= all.len() as f64, "{m}");
    assert!(count("afetm_analyzer_afcts_total") >= all.len() as f64, "{m}");
    assert_eq!(count("afetm_analyzer_database_up"), 1.0, "{m}");
    let agent_count =
        |name: &str| am.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok());
    assert!(agent_count("afetm_agent_events_total") > Some(0.0), "{am}");
    assert!(agent_count("afetm_agent_batches_acked_total") > Some(0.0), "{am}");
    assert!(agent_count("afetm_agent_plans_applied_total") >= Some(2.0), "the plan change is counted: {am}");
    let sample = |t: &str| {
        t.lines().filter(|l| l.starts_with("afetm_") && !l.contains("_bucket")).collect::<Vec<_>>().join("\n")
    };
    eprintln!("metrics sample, analyzer:\n{}\nagent:\n{}", sample(&m), sample(&am));
    web_view_shows(worst, &all);
    // WatchDiagnoses streamed every diagnosis as it was stored, the worst one included.
    let t = Instant::now();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
        let d = next.expect("WatchDiagnoses did not send the worst window").unwrap().expect("stream ended");
        if d.window_id == worst.window_id {
            assert_eq!(&d, *worst);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "WatchDiagnoses did not send the worst window");
    }
}

/// `GET /metrics` from `addr`.
fn scrape(addr: &str) -> String {
    testbed::scrape::scrape(addr).expect("metrics endpoint")
}

/// The web view's address in the shop test.
const WEB: &str = "127.0.0.1:27434";

/// Headless Chromium (Debian's package) against the web view: the index lists the diagnosed
/// windows, and the worst window's page shows its verdict, its suspects with probabilities
/// and its AFCT drawn with the top suspect outlined; a screenshot of that page is kept at
/// `target/tmp/web-view-diagnosis.png`.
fn web_view_shows(worst: &pb::Diagnosis, all: &[pb::Diagnosis]) {
    let chromium = |args: &[&str]| {
        let o = Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            .args(args)
            .output()
            .expect("chromium (cargo xtask setup installs it)");
        assert!(o.status.success(), "chromium {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let index = chromium(&["--dump-dom", &format!("http://{WEB}/")]);
    assert!(index.contains("Latest windows"), "{index}");
    for d in all.iter().take(3) {
        assert!(index.contains(&format!("href=\"/window/{}\"", d.window_id)), "window {} not listed", d.window_id);
    }
    let url = format!("http://{WEB}/window/{}", worst.window_id);
    let dom = chromium(&["--dump-dom", &url]);
    let verdict = if worst.error { "Error" } else { "Normal" };
    assert!(
        dom.contains(&format!("id=\"verdict\""))
            && dom.contains(&format!("{verdict} - P(normal) {:.3}", worst.p_normal)),
        "{dom}"
    );
    for s in &worst.top {
        assert!(
            dom.contains(&format!("<td class=\"function\">{}</td>", s.function)),
            "suspect {} missing: {dom}",
            s.function
        );
        assert!(dom.contains(&format!("<td class=\"probability\">{:.3}</td>", s.probability)), "{dom}");
    }
    assert!(dom.contains("<svg") && dom.matches("class=\"node").count() >= 2, "no AFCT drawn: {dom}");
    let top = &worst.top[0].function;
    assert!(
        dom.contains(&format!("class=\"node suspect\" data-function=\"{top}\"")),
        "top suspect {top} not outlined: {dom}"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-view-diagnosis.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1400,1200", &url]);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot {} bytes", png.len());
    eprintln!("web view screenshot: {}", shot.display());
}
