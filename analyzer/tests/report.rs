//! Logs beside the traces, end to end on the real shop: a small real campaign on the
//! source-built redis (one function, `setGenericCommand`, every fault type) fills an FDDB with
//! call trees and the servers' logs; Chimera is trained on those logs (`train-logs`) and the
//! GCN on the trees (`train`); the daemon serves both with the FDDB; an agent traces the
//! shop's redis and tails its log files (`--log`); after a normal run, a deadlock and then a
//! crash are injected into `setGenericCommand` while the shop runs. Checked: the stop reaches
//! the daemon, which diagnoses a deadlock at that function in a window after the injection
//! (the kernel's stop signal, not the tree); the log lines reach the daemon and
//! land in their windows; an engineer's feedback is stored (and joins the next `train-logs`)
//! and refused for an unknown window or cause; `ask` lists the windows to judge next;
//! the crashed process's last window gets a report that names the crash and the injected
//! function (and the killed thread's stack at the SIGKILL, from it outwards), lists the clients' errors among its symptoms, cites the FDDB's historical runs in
//! which that function's faults crashed redis and gives the crash SOP's steps; the normal run
//! before the faults is diagnosed, raises no alarm of the GCN and its report shows no exit.
//! Root only.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use afetm_proto::{self as pb, control_client::ControlClient};
use common::{Down, Kill, agent, bin, connect, run_ok};

mod common;

const RATE: f64 = 100.0;

fn load(cfg: &testbed::Config, secs: u64) -> testbed::load::Report {
    common::load(cfg, secs, RATE)
}
const FUNCTION: &str = "setGenericCommand";

fn campaign(dir: &Path) -> PathBuf {
    let fddb = dir.join("fddb.sqlite");
    run_ok(
        Command::new(bin("afetm-campaign"))
            .args(["redis", "--scope", &format!("functions:{FUNCTION}"), "--db"])
            .arg(&fddb)
            .arg("--work-dir")
            .arg(dir.join("campaign"))
            .arg("--bin-dir")
            .arg(bin(""))
            .args(["--base-port", "24380", "--cap", "2", "--eval-runs", "0", "--normal-runs", "8", "--sample", "2s"])
            .args(["--rate", &RATE.to_string()]),
    );
    fddb
}

/// `fddb fct` draws one of the campaign's FCTs, found by a hash prefix: DOT with an edge per
/// non-root node, SVG with a node per tree node and the asked function (the root's) marked.
fn fct_drawn(fddb: &Path, dir: &Path) {
    let analyzer = env!("CARGO_BIN_EXE_afetm-analyzer");
    let export = dir.join("fddb.jsonl");
    run_ok(Command::new(analyzer).arg("fddb").arg("--db").arg(fddb).arg("export").arg(&export));
    let (hash, tree) = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["type"] == "fct")
        .map(|l| (l["hash"].as_str().unwrap().to_string(), l))
        .expect("the campaign stored FCTs");
    assert!(tree["tree"].as_str().is_some_and(|t| !t.is_empty()));
    let fct = |format: &str, highlight: &str| {
        run_ok(Command::new(analyzer).arg("fddb").arg("--db").arg(fddb).args([
            "fct",
            "--target",
            "redis",
            "--hash",
            &hash[..10],
            "--format",
            format,
            "--highlight",
            highlight,
        ]))
    };
    let dot = fct("dot", "");
    let root = dot.split("label=\"").nth(1).and_then(|l| l.split('"').next()).expect("a labelled node").to_string();
    let svg = fct("svg", &root);
    let nodes = svg.matches("<g class=\"node").count();
    assert!(dot.starts_with("digraph") && nodes >= 2, "{dot}");
    assert!(dot.matches(" -> ").count() < nodes, "fewer edges than nodes in a forest");
    assert!(svg.contains("class=\"node suspect\""), "{root} is marked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_gets_a_report_that_names_it() {
    if testbed::skip::needs_root("starting the testbed and injecting faults") {
        return;
    }
    let Some(binaries) = testbed::build::binaries(&testbed::build::cache_dir()) else {
        panic!("source builds missing: cargo xtask testbed build");
    };
    let dir = tempfile::tempdir().unwrap();
    let fddb = campaign(dir.path());
    fct_drawn(&fddb, dir.path());
    let redis = binaries.redis.clone();
    let plan = dir.path().join("plan.json");
    let points = serde_json::json!([{"function": "*", "mode": "event"}]);
    std::fs::write(&plan, serde_json::json!({"target": {"path": redis}, "points": points}).to_string()).unwrap();
    let analyzer = env!("CARGO_BIN_EXE_afetm-analyzer");
    let (model, logs_model) = (dir.path().join("model"), dir.path().join("logs-model"));
    let gcn = run_ok(
        Command::new(analyzer)
            .args(["train", "--target", "redis", "--fddb"])
            .arg(&fddb)
            .arg("--plan")
            .arg(&plan)
            .arg("--out")
            .arg(&model),
    );
    eprintln!("{gcn}");
    let trained = run_ok(
        Command::new(analyzer)
            .args(["train-logs", "--target", "redis", "--fddb"])
            .arg(&fddb)
            .arg("--out")
            .arg(&logs_model),
    );
    assert!(trained.contains("Chimera trained on"), "{trained}");

    let mut cfg = testbed::Config::new(dir.path().join("shop"));
    cfg.base_port = 24680;
    cfg.apaches = 1;
    cfg.binaries = binaries;
    let _ = testbed::down(&cfg);
    testbed::up(&cfg).unwrap();
    let _down = Down(cfg.clone());

    let port = 24995;
    let mut daemon = Command::new(analyzer)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--window", "1s", "--top-k", "10", "--db"])
        .arg(dir.path().join("live.sqlite"))
        .arg("--model")
        .arg(&model)
        .arg("--log-model")
        .arg(&logs_model)
        .arg("--fddb")
        .arg(&fddb)
        .stderr(std::fs::File::create(dir.path().join("analyzer.log")).unwrap())
        .spawn()
        .unwrap();
    let mut q = connect(port, &mut daemon).await;
    let mut procs = Kill(vec![daemon]);
    let logs: Vec<PathBuf> = ["redis.log", "php-error.log", "nginx-access.log", "nginx-error.log"]
        .iter()
        .map(|f| cfg.logs_dir().join(f))
        .collect();
    procs.0.push(agent(&plan, port, dir.path(), &logs));
    let normal = load(&cfg, 3);
    assert_eq!(normal.errors, 0);
    let normal_end = testbed::monotonic_ns();
    let pid = testbed::servers(&cfg).unwrap().into_iter().find(|s| s.name.starts_with("redis")).unwrap().pid;
    let hung = deadlock(&mut q, &cfg, &redis, pid).await;
    assert_eq!(hung.top[0].function, FUNCTION, "every function is traced: the stopped call is the last: {hung:?}");
    let mut inject = Command::new(bin("afetm-inject"))
        .arg("--module")
        .arg(&redis)
        .args(["--function", FUNCTION, "--fault", "crash", "--pid", &pid.to_string(), "--foreign"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let after = load(&cfg, 3);
    let _ = inject.kill();
    let _ = inject.wait();
    assert!(after.errors > 0, "the crash did not show to clients: {after:?}");
    let mut agent = procs.0.remove(1);
    let _ = Command::new("kill").args(["-TERM", &agent.id().to_string()]).status();
    let _ = agent.wait();

    // The lines reached the daemon, counted, and sit in their windows.
    let agents = q.list_agents(pb::ListAgentsRequest { without_plans: true }).await.unwrap().into_inner().agents;
    let live = agents.iter().find(|a| a.agent_id == "live").unwrap();
    assert!(live.log_lines > 0, "no log line stored: {live:?}");
    assert_eq!(live.log_drops, 0);
    let windows = q
        .list_windows(pb::ListWindowsRequest { agent_id: "live".into(), pid, closed_only: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .windows;
    let last = windows.iter().max_by_key(|w| w.start_ns).expect("no closed window of redis");
    let mut lines = 0;
    for w in &windows {
        let l = q.window_logs(pb::WindowLogsRequest { window_id: w.id }).await.unwrap().into_inner().lines;
        assert!(l.iter().all(|x| x.ts_ns >= w.start_ns && x.ts_ns < w.end_ns));
        lines += l.len();
    }
    assert!(lines > 0, "no window holds a log line");

    // The crashed process's last window: the report names the crash and the function.
    let t = Instant::now();
    while q
        .list_diagnoses(pb::ListDiagnosesRequest { window_id: last.id, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .diagnoses
        .is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(60), "the last window was not diagnosed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = q.report(pb::ReportRequest { window_id: last.id, similar: 5 }).await.unwrap().into_inner();
    eprintln!("{}", r.markdown);
    assert!(r.error, "{}", r.markdown);
    let top = r.causes.first().expect("no cause");
    assert_eq!((top.function.as_str(), top.kind.as_str()), (FUNCTION, "crash"), "{}", r.markdown);
    assert!(r.title.contains("crash") && r.title.contains(FUNCTION) && r.title.contains("exited"), "{}", r.title);
    assert!(r.symptoms.iter().any(|s| s.contains("exited")), "{:?}", r.symptoms);
    // The clients' errors in the logs: PHP's read errors and nginx's failed requests come when
    // redis dies, which may be after its last window's end (lines read later are in no window of
    // this process): the report shows them from the window or from the seconds after the exit.
    assert!(
        r.symptoms.iter().any(|s| (s.contains("php-error.log") && s.contains("Error level"))
            || (s.contains("nginx-access.log") && s.contains("Warning level"))),
        "{:?}",
        r.symptoms
    );
    // The kernel's word on it: redis's threads were killed by SIGKILL, with their last calls.
    assert!(r.symptoms.iter().any(|s| s.contains("was killed by SIGKILL (9)")), "{:?}", r.symptoms);
    // Where: the injector kills at the function's entry, so the killed thread's stack at the
    // SIGKILL starts in it and goes on through its callers.
    assert!(
        r.symptoms.iter().any(|s| s.contains(&format!("was killed by SIGKILL (9) in {FUNCTION} ← "))),
        "{:?}",
        r.symptoms
    );
    // Historical runs in which the function's faults crashed redis.
    assert!(r.similar.iter().any(|s| s.function == FUNCTION && s.manifestation == "crash"), "{:?}", r.similar);
    assert_eq!(r.sop, "crash");
    assert!(!r.resolution.is_empty() && r.markdown.contains("## Resolution (SOP: crash)"));

    // The normal run before the faults: every window of redis that ended before the deadlock
    // was diagnosed, and none alarmed. Before, this was printed only: in 8 runs here the live
    // normal windows' least P(normal) was 0.37-0.99 and the threshold, chosen on one held-out
    // normal run, 0.02-0.99 (one run alarmed). Three causes, fixed since: the campaign's shop
    // held 50 items (the live one 200), so its normal windows held 20-40% fewer redis commands;
    // the FDDB gave every window the calls of the first window of its shape; and with one
    // held-out normal run (of four) Youden's J put t just above a held-out fault run that
    // scored like the normal ones (t = 0.904, live windows at 0.908). Now the campaign has 8
    // normal runs (2 held out) and t stays a logit below the least normal held-out run
    // (`afetm_diagnosis::train::NORMAL_MARGIN`).
    let normal: Vec<pb::Diagnosis> = q
        .list_diagnoses(pb::ListDiagnosesRequest { agent_id: "live".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .diagnoses
        .into_iter()
        .filter(|d| d.pid == pid && d.end_ns <= normal_end)
        .collect();
    let seen: Vec<String> =
        normal.iter().map(|d| format!("{} p={:.3} err={}", d.window_id, d.p_normal, d.error)).collect();
    eprintln!("normal run: {seen:?}");
    assert!(!normal.is_empty(), "no window of the normal run was diagnosed");
    let threshold = std::fs::read_to_string(model.join("manifest.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|m| m["threshold"].as_f64());
    let alarms = normal.iter().filter(|d| d.error).count();
    eprintln!("normal run: {alarms} of {} windows alarmed (threshold {threshold:?})", normal.len());
    assert_eq!(alarms, 0, "a normal window alarmed (threshold {threshold:?}): {seen:?}");
    let early = windows.iter().find(|w| w.end_ns <= normal_end).expect("no window of the normal run");
    let r0 = q.report(pb::ReportRequest { window_id: early.id, similar: 5 }).await.unwrap().into_inner();
    // The report's own verdict also reads Chimera, which alarms on most normal windows of a
    // campaign this small (see the evaluation): printed, not asserted.
    eprintln!("normal window {}: {}", early.id, r0.title);
    assert!(!r0.symptoms.iter().any(|s| s.contains("exited")), "{:?}", r0.symptoms);

    // Feedback: stored for a real window, refused for an unknown one.
    let mut c = ControlClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    let line = r.symptoms.iter().find(|s| s.contains(".log")).cloned().unwrap_or_default();
    let fb = pb::FeedbackRequest { window_id: last.id, line, confirm: true, note: "test".into(), cause: String::new() };
    assert!(c.feedback(fb).await.unwrap().into_inner().id > 0);
    let bad = c.feedback(pb::FeedbackRequest { window_id: 999_999, ..Default::default() }).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    let cause = |cause: &str| pb::FeedbackRequest {
        window_id: last.id,
        confirm: true,
        cause: cause.into(),
        ..Default::default()
    };
    assert!(c.feedback(cause(&format!("{FUNCTION}/crash"))).await.is_ok());
    let bad = c.feedback(cause("setGenericCommand/melted")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    // Active learning: the windows whose root cause GARCA is least sure of (the judged one
    // is labelled now, so it is not asked about).
    let asked = run_ok(
        Command::new(analyzer)
            .args(["ask", "--target", "redis", "--count", "3", "--fddb"])
            .arg(&fddb)
            .arg("--db")
            .arg(dir.path().join("live.sqlite"))
            .arg("--plan")
            .arg(&plan),
    );
    let asked_windows: Vec<&str> = asked.lines().filter(|l| l.trim_start().starts_with("window ")).collect();
    assert_eq!(asked_windows.len(), 3.min(windows.len() - 1), "{asked}");
    assert!(!asked_windows.iter().any(|l| l.trim_start().starts_with(&format!("window {} ", last.id))), "{asked}");
    let missing = q.report(pb::ReportRequest { window_id: 999_999, similar: 0 }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    // The judged window joins the next training of the log model.
    let retrained = run_ok(
        Command::new(analyzer)
            .args(["train-logs", "--target", "redis", "--epochs", "20", "--fddb"])
            .arg(&fddb)
            .arg("--db")
            .arg(dir.path().join("live.sqlite"))
            .arg("--out")
            .arg(dir.path().join("logs-model-2")),
    );
    assert!(retrained.contains("and 1 judged windows"), "{retrained}");
}

/// Injects a deadlock into `FUNCTION` of the running redis `pid` under load and waits for the
/// daemon's deadlock diagnosis of a window after the injection (the kernel's stop signal reaches
/// it through the agent); then ends the injector and lets redis go on (SIGCONT).
async fn deadlock(
    q: &mut afetm_proto::query_client::QueryClient<tonic::transport::Channel>,
    cfg: &testbed::Config,
    redis: &Path,
    pid: u32,
) -> pb::Diagnosis {
    let hung_at = testbed::monotonic_ns();
    let mut hang = Command::new(bin("afetm-inject"))
        .arg("--module")
        .arg(redis)
        .args(["--function", FUNCTION, "--fault", "deadlock", "--pid", &pid.to_string(), "--foreign"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Clients block on the stopped redis; they go on once it is continued.
    let busy = {
        let cfg = cfg.clone();
        std::thread::spawn(move || load(&cfg, 2))
    };
    let t = Instant::now();
    let found = loop {
        let req = pb::ListDiagnosesRequest { agent_id: "live".into(), errors_only: true, ..Default::default() };
        let all = q.list_diagnoses(req).await.unwrap().into_inner().diagnoses;
        let hung = all
            .into_iter()
            .find(|d| d.pid == pid && d.end_ns > hung_at && d.top.first().is_some_and(|s| s.kind == "deadlock"));
        if let Some(d) = hung {
            break Some(d);
        }
        if t.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = hang.kill();
    let _ = hang.wait();
    let _ = Command::new("kill").args(["-CONT", &pid.to_string()]).status();
    let _ = busy.join();
    found.expect("the deadlock was not diagnosed within 60 s")
}
