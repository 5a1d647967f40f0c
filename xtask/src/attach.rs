//! `cargo xtask bench attach`: how long a live plan change takes on redis-server: attaching
//! 100, 1,000 and all of its functions to a running agent and detaching them again, idle and
//! under redis-benchmark load, next to a plan change that changes nothing (the baseline: gRPC
//! round trip and plan resolution).
use std::{
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_proto::{self as pb, control_client::ControlClient, query_client::QueryClient};
use anyhow::{Context, Result, bail};

use crate::target_dir;
use crate::{
    Guard,
    bench::{start_agent_as, start_analyzer_db, stop_agent},
    cargo, run,
};

const REDIS_PORT: &str = "20090";

struct Pusher {
    rt: tokio::runtime::Runtime,
    url: String,
    target: String,
    version: u64,
}

impl Pusher {
    /// Pushes `points` and returns (agent's apply time, wall time until the report arrived).
    fn push(&mut self, points: &[(String, pb::TraceMode)]) -> Result<(Duration, Duration, pb::PlanReport)> {
        self.version += 1;
        let version = self.version;
        let plan = pb::Plan {
            version,
            points: points.iter().map(|(f, m)| pb::TracePoint { function: f.clone(), mode: *m as i32 }).collect(),
            target_path: self.target.clone(),
            target_pid: 0,
        };
        let url = self.url.clone();
        let t = Instant::now();
        self.rt.block_on(async {
            let mut c = ControlClient::connect(url.clone()).await?;
            c.set_plan(pb::SetPlanRequest { agent_id: "attach".into(), plan: Some(plan) }).await?;
            let mut q = QueryClient::connect(url).await?;
            loop {
                let agents = q.list_agents(pb::ListAgentsRequest { without_plans: false }).await?.into_inner().agents;
                if let Some(r) = agents.into_iter().find(|a| a.agent_id == "attach").and_then(|a| a.last_plan)
                    && r.version == version
                {
                    if !r.ok {
                        bail!("plan refused: {}", r.error);
                    }
                    return Ok((Duration::from_micros(r.apply_us), t.elapsed(), r));
                }
                if t.elapsed() > Duration::from_secs(60) {
                    bail!("plan {version} not applied after 60 s");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn attach_bench(reps: usize) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer"]))?;
    let bin = target_dir().join("release");
    let dir = target_dir().join("bench-attach");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let redis = Path::new("/usr/bin/redis-server");
    let module = afetm_elf::symbols::Module::load(redis).context("reading redis-server")?;
    let mut names: Vec<(u64, String)> = module.functions().iter().map(|f| (f.start, f.name.to_string())).collect();
    names.sort();
    let names: Vec<String> = names.into_iter().map(|(_, n)| n).filter(|n| n != "call").collect();

    let redis_proc = Command::new(redis)
        .args(["--port", REDIS_PORT, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let mut guard = Guard(vec![redis_proc]);
    let listen = "127.0.0.1:20084";
    guard.0.push(start_analyzer_db(&bin, &dir, &dir.join("attach.sqlite"), listen)?);
    let plan = dir.join("call.json");
    std::fs::write(
        &plan,
        serde_json::json!({"target": {"path": redis}, "points": [{"function": "call", "mode": "event"}]}).to_string(),
    )?;
    let (agent, log) = start_agent_as(&bin, &plan, &format!("http://{listen}"), &dir, None, "attach")?;
    let mut agent = Guard(vec![agent]);
    let mut p = Pusher {
        rt: tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        url: format!("http://{listen}"),
        target: redis.display().to_string(),
        version: 0,
    };
    sleep(Duration::from_millis(500));
    let base: Vec<(String, pb::TraceMode)> = vec![("call".into(), pb::TraceMode::Event)];
    let sizes = [100, 1000, names.len()];
    println!(
        "redis-server: {} functions; agent apply time (median of {reps}) and wall time to the report",
        names.len() + 1
    );
    for loaded in [false, true] {
        let mut bench_proc = None;
        if loaded {
            let c = Command::new("redis-benchmark")
                .args(["-p", REDIS_PORT, "-q", "-c", "8", "-n", "100000000", "-t", "get,set", "-r", "1000"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting redis-benchmark")?;
            bench_proc = Some(Guard(vec![c]));
            sleep(Duration::from_millis(500));
        }
        let mut noop = Vec::new();
        for _ in 0..reps {
            noop.push(p.push(&base)?.0.as_secs_f64() * 1e3);
        }
        println!(
            "\n{}: no-op plan change (baseline): {:.2} ms",
            if loaded { "under redis-benchmark (8 connections, GET/SET)" } else { "idle" },
            median(noop)
        );
        println!("{:>6} {:>12} {:>12} {:>14} {:>14}", "N", "attach ms", "detach ms", "attach/noop", "wall attach ms");
        for n in sizes {
            let mut points = base.clone();
            points.extend(names.iter().take(n).map(|f| (f.clone(), pb::TraceMode::Count)));
            let (mut at, mut de, mut wall) = (Vec::new(), Vec::new(), Vec::new());
            let mut noop_here = Vec::new();
            for _ in 0..reps {
                let (a, w, r) = p.push(&points)?;
                if r.attached as usize != n {
                    bail!("expected {n} attached, report says {} ({} unprobeable)", r.attached, r.unprobeable.len());
                }
                at.push(a.as_secs_f64() * 1e3);
                wall.push(w.as_secs_f64() * 1e3);
                let (d, _, r) = p.push(&base)?;
                if r.detached as usize != n {
                    bail!("expected {n} detached, report says {}", r.detached);
                }
                de.push(d.as_secs_f64() * 1e3);
                noop_here.push(p.push(&base)?.0.as_secs_f64() * 1e3);
            }
            let noop = median(noop_here).max(1e-3);
            println!(
                "{n:>6} {:>12.1} {:>12.1} {:>14.0} {:>14.1}",
                median(at.clone()),
                median(de),
                median(at) / noop,
                median(wall)
            );
        }
        drop(bench_proc);
    }
    let log = stop_agent(agent.0.remove(0), &log)?;
    if !log.contains("kernel_drops=0") {
        eprintln!("agent log:\n{log}");
    }
    Ok(())
}
