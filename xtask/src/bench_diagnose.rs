//! `cargo xtask bench diagnose`: what online diagnosis costs the analyzer.
//!
//! The same daemon runs twice in one go, first without models, then with four loaded (one for
//! the traced program, three for other modules, each the size of the redis paper-sample model:
//! 2,000 functions, 200 classes). Each time an agent traces `--procs` copies of the bundled
//! calltree program (1 s windows) for `--seconds`. Printed: windows closed, diagnoses stored and
//! per second, p50/p99 of the time from a window's close to its stored diagnosis, the daemon's
//! peak RSS with and without models (ratio), and `Query.Diagnose` calls per second on a stored
//! AFCT. The models are trained for one epoch on synthetic trees: their cost, not their
//! accuracy, is measured.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    thread::sleep,
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
use anyhow::{Context, Result};

use crate::{
    Guard,
    bench::{start_agent_as, stop_agent},
    cargo, run, target_dir,
};

const TRACED: [&str; 5] = ["main", "worker", "leaf", "op_add", "op_mul"];

/// A model for `module` whose plan is [`TRACED`] in event mode, sized like a real one.
fn model(dir: &Path, module: &str) -> Result<PathBuf> {
    let vocab = 2000;
    let classes = 200;
    let node = |f: String, parent: i32| pb::TreeNode {
        function: f,
        module: module.into(),
        color: pb::Color::White as i32,
        parent,
        children: vec![],
        calls: 3,
    };
    let samples: Vec<Sample> = (0..classes + 20)
        .map(|i| {
            let mut nodes = vec![node("main".into(), -1), node("worker".into(), 0)];
            for j in 0..30 {
                nodes.push(node(format!("f{}", (i * 31 + j * 7) % vocab), 1));
            }
            let class = if i < classes {
                Class::Fault { function: format!("f{i}"), kind: FaultKind::ALL[i % 5] }
            } else {
                Class::Normal
            };
            let graph = NamedGraph::from_tree(&pb::Tree { nodes, truncated: false }).map_err(|e| anyhow::anyhow!(e))?;
            Ok(Sample { graph, class: class.clone(), run: i as i64, run_class: class })
        })
        .collect::<Result<_>>()?;
    let plan = PlanKey { traced: TRACED.iter().map(|s| s.to_string()).collect(), callstack: vec![] };
    let target = Target { name: module.into(), module: module.into(), plan, window_ms: 1000 };
    let cfg = TrainConfig { epochs: 1, val_share: 0.0, ..Default::default() };
    let m = train(&samples, target, &cfg, |_| {})?;
    let out = dir.join(format!("model-{module}"));
    m.save(&out)?;
    Ok(out)
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

struct Pass {
    windows: u64,
    diagnoses: Vec<pb::Diagnosis>,
    peak_rss_kb: u64,
    calls_per_s: f64,
}

fn pass(bin: &Path, dir: &Path, prog: &Path, models: &[PathBuf], procs: usize, seconds: u64) -> Result<Pass> {
    let listen = "127.0.0.1:20091";
    let db = dir.join("bench-diagnose.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let mut cmd = Command::new(bin.join("afetm-analyzer"));
    cmd.args(["serve", "--listen", listen, "--window", "1s", "--db"]).arg(&db);
    for m in models {
        cmd.arg("--model").arg(m);
    }
    let analyzer = cmd.stderr(std::fs::File::create(dir.join("analyzer.log"))?).spawn()?;
    let pid = analyzer.id();
    let _a = Guard(vec![analyzer]);
    sleep(Duration::from_millis(800));
    let plan = dir.join("plan.json");
    let points: Vec<serde_json::Value> =
        TRACED.iter().map(|f| serde_json::json!({"function": f, "mode": "event"})).collect();
    std::fs::write(&plan, serde_json::json!({"target": {"path": prog}, "points": points}).to_string())?;
    let server = format!("http://{listen}");
    let (agent, log) = start_agent_as(bin, &plan, &server, dir, None, "bench-diagnose")?;
    let children: Vec<Child> = (0..procs)
        .map(|_| Command::new(prog).args(["20", &seconds.to_string()]).stdout(std::process::Stdio::null()).spawn())
        .collect::<Result<_, _>>()?;
    for mut c in children {
        c.wait()?;
    }
    stop_agent(agent, &log)?;
    sleep(Duration::from_secs(2));
    let peak_rss_kb = rss_kb(pid, "VmHWM:");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut q = QueryClient::connect(server.clone()).await?;
        let windows = q.stats(pb::StatsRequest {}).await?.into_inner().windows_closed;
        let req = pb::ListDiagnosesRequest { limit: 100_000, ..Default::default() };
        let diagnoses = q.list_diagnoses(req).await?.into_inner().diagnoses;
        let mut calls_per_s = 0.0;
        if let Some(d) = diagnoses.first() {
            let tree = q.get_afct(pb::GetAfctRequest { window_id: d.window_id, tid: d.tid }).await?.into_inner().tree;
            let t = Instant::now();
            let n = 300;
            for _ in 0..n {
                let req = pb::DiagnoseRequest { model: "calltree".into(), tree: tree.clone(), top_k: 3 };
                q.diagnose(req).await?;
            }
            calls_per_s = n as f64 / t.elapsed().as_secs_f64();
        }
        anyhow::Ok(Pass { windows, diagnoses, peak_rss_kb, calls_per_s })
    })
}

fn percentile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn diagnose_bench(procs: usize, seconds: u64) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer"]))?;
    let bin = target_dir().join("release");
    let dir = target_dir().join("bench-diagnose");
    std::fs::create_dir_all(&dir)?;
    let prog = crate::demo::build_calltree(&dir)?;
    let module = prog.file_name().context("program name")?.to_string_lossy().to_string();
    let t = Instant::now();
    let mut models = vec![model(&dir, &module)?];
    for m in ["other-a", "other-b", "other-c"] {
        models.push(model(&dir, m)?);
    }
    println!("4 models trained (1 epoch each) in {:.1} s", t.elapsed().as_secs_f64());
    let base = pass(&bin, &dir, &prog, &[], procs, seconds)?;
    let with = pass(&bin, &dir, &prog, &models, procs, seconds)?;
    let mut lat: Vec<u64> = with.diagnoses.iter().map(|d| d.latency_us).collect();
    lat.sort_unstable();
    println!("{procs} processes traced for {seconds} s, 1 s windows");
    println!("{:<28} {:>12} {:>12} {:>8}", "", "no models", "4 models", "ratio");
    println!(
        "{:<28} {:>12} {:>12} {:>8.2}",
        "windows closed",
        base.windows,
        with.windows,
        with.windows as f64 / base.windows.max(1) as f64
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8.2}",
        "peak RSS (MiB)",
        base.peak_rss_kb / 1024,
        with.peak_rss_kb / 1024,
        with.peak_rss_kb as f64 / base.peak_rss_kb.max(1) as f64
    );
    println!(
        "diagnoses stored: {} ({:.1}/s over the run)",
        with.diagnoses.len(),
        with.diagnoses.len() as f64 / seconds as f64
    );
    println!(
        "window close -> stored diagnosis: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lat, 0.5) as f64 / 1e3,
        percentile(&lat, 0.99) as f64 / 1e3,
        lat.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!("Query.Diagnose on a stored AFCT: {:.0} calls/s", with.calls_per_s);
    Ok(())
}
