//! `cargo xtask testbed sample <target>`: the weights w_j of trace point selection (AFETM
//! sec. III.A) for one server of a running testbed, and its normal FCTs.
//!
//! 1. An agent counts every function of the target (count-only mode, one uprobe_multi link)
//!    while the CRUD mix runs for `--period`; `afetm-analyzer weights` turns the counts into
//!    calls per second (`<out>/<target>.weights.json`; functions never called weigh 0).
//! 2. Unless `--normal 0s`: every function that was called is traced in event mode for
//!    `--normal` under a light fixed-rate load; the windows of agent `normal-<target>` in
//!    `<out>/<target>.sqlite` are the normal FCTs that `afetm-analyzer select --db` colors.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use crate::target_dir;
use crate::{
    Guard,
    bench::{start_agent_as, start_analyzer_db, stop_agent},
    cargo, run,
    testbed::Where,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Redis,
    Nginx,
    Httpd,
    Sqlite,
}

#[derive(Args)]
pub struct SampleArgs {
    pub target: Target,
    #[command(flatten)]
    pub at: Where,
    /// Sampling period (count mode on every function).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub period: Duration,
    /// Load during the sampling period: connections of the closed-loop CRUD mix.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Untraced run of the same load first, for its request rate: the weights are calls per
    /// request at that rate (counting every function slows the target down); 0s keeps raw
    /// calls per second of the sampling period.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub baseline: Duration,
    /// Length of the normal run (full tracing of the called functions); 0s skips it.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub normal: Duration,
    /// Requests per second during the normal run (full tracing is expensive).
    #[arg(long, default_value_t = 20.0)]
    pub normal_rate: f64,
    /// Output folder (default target/testbed-sample).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Build the agent and analyzer first (callers that built them already, with other
    /// packages, skip it: another package set can unify features differently and rebuild).
    #[arg(skip = true)]
    pub build: bool,
}

/// The file the target's code lives in, found from the running testbed's processes.
pub(crate) fn target_file(cfg: &testbed::Config, target: Target) -> Result<PathBuf> {
    let servers = testbed::servers(cfg)?;
    let want = match target {
        Target::Redis => "redis",
        Target::Nginx => "nginx",
        Target::Httpd | Target::Sqlite => "apache",
    };
    let s = servers.iter().find(|s| s.name.starts_with(want)).with_context(|| {
        format!("no {want} running in {}: start it with `cargo xtask testbed up`", cfg.run_dir.display())
    })?;
    if target != Target::Sqlite {
        return std::fs::read_link(format!("/proc/{}/exe", s.pid))
            .with_context(|| format!("{} pid {} is gone", s.name, s.pid));
    }
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.pid))
        .with_context(|| format!("{} pid {} is gone", s.name, s.pid))?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| Path::new(p).file_name().is_some_and(|n| n.to_string_lossy().starts_with("libsqlite3.so")))
        .map(PathBuf::from)
        .with_context(|| format!("{} pid {} has no libsqlite3 mapped", s.name, s.pid))
}

pub fn sample(a: SampleArgs) -> Result<()> {
    let cfg = a.at.config();
    cfg.check_reachable()?;
    let name = format!("{:?}", a.target).to_lowercase();
    let file = target_file(&cfg, a.target)?;
    let real = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
    let module = real.file_name().map(|n| n.to_string_lossy().into_owned()).context("target file has no name")?;
    if a.build {
        run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer"]))?;
    }
    let bin = target_dir().join("release");
    let out = a.out.clone().unwrap_or_else(|| target_dir().join("testbed-sample"));
    std::fs::create_dir_all(&out)?;
    let db = out.join(format!("{name}.sqlite"));
    let listen = "127.0.0.1:20083";
    let server = format!("http://{listen}");
    let _analyzer = Guard(vec![start_analyzer_db(&bin, &out, &db, listen)?]);

    let mut l = testbed::load::LoadConfig::new(cfg.url());
    l.items = cfg.seed_items;
    l.connections = a.connections;
    l.duration = a.period;
    l.warmup = Duration::ZERO;
    let real_rps = if a.baseline.is_zero() {
        None
    } else {
        let mut b = l.clone();
        b.duration = a.baseline;
        b.warmup = Duration::from_secs(1);
        let r = testbed::load::run(&b)?;
        println!("{name}: untraced baseline {:.0} req/s ({} errors)", r.throughput_rps, r.errors);
        Some(r.throughput_rps)
    };
    let plan = out.join(format!("{name}.count.json"));
    std::fs::write(
        &plan,
        serde_json::json!({"target": {"path": file}, "points": [{"function": "*", "mode": "count"}]}).to_string(),
    )?;
    let id = format!("count-{name}");
    let t_attach = Instant::now();
    let (child, log) = start_agent_as(&bin, &plan, &server, &out, None, &id)?;
    let mut agent = Guard(vec![child]);
    println!(
        "{name}: counting every function of {} (attached in {:.2} s)",
        real.display(),
        t_attach.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let report = testbed::load::run(&l)?;
    let period = t.elapsed();
    let log = stop_agent(agent.0.remove(0), &log)?;
    if report.errors > 0 {
        eprintln!("warning: {} requests failed during sampling", report.errors);
    }
    let weights = out.join(format!("{name}.weights.json"));
    let workload = format!("CRUD mix, {} connections, closed loop, {:.0} req/s", a.connections, report.throughput_rps);
    let mut cmd = Command::new(bin.join("afetm-analyzer"));
    cmd.args(["weights", "--server", &server, "--agent", &id, "--module", &module, "--period"])
        .arg(format!("{}ms", period.as_millis()))
        .args(["--workload", &workload, "--out"])
        .arg(&weights);
    if let Some(rps) = real_rps.filter(|r| *r > 0.0 && report.requests > 0) {
        cmd.args(["--requests", &report.requests.to_string(), "--real-rps", &format!("{rps:.1}")]);
        println!(
            "{name}: sampling ran at {:.0} req/s, {:.1}x slower than untraced; weights are calls per request at {rps:.0} req/s",
            report.throughput_rps,
            rps / report.throughput_rps.max(1e-9)
        );
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("afetm-analyzer weights failed; agent log:\n{log}");
    }

    if !a.normal.is_zero() {
        let w: serde_json::Value = serde_json::from_slice(&std::fs::read(&weights)?)?;
        let called: Vec<serde_json::Value> = w["functions"]
            .as_object()
            .context("weights file without functions")?
            .keys()
            .map(|f| serde_json::json!({"function": f, "mode": "event"}))
            .collect();
        let plan = out.join(format!("{name}.normal.json"));
        std::fs::write(&plan, serde_json::json!({"target": {"path": file}, "points": called}).to_string())?;
        let id = format!("normal-{name}");
        let (child, log) = start_agent_as(&bin, &plan, &server, &out, None, &id)?;
        agent.0.push(child);
        l.duration = a.normal;
        l.rate = Some(a.normal_rate);
        l.connections = 2;
        let r = testbed::load::run(&l)?;
        stop_agent(agent.0.remove(0), &log)?;
        println!(
            "{name}: normal run: {} functions traced for {:.0?} at {:.0} req/s ({} errors) -> agent {id} in {}",
            called.len(),
            a.normal,
            r.throughput_rps,
            r.errors,
            db.display()
        );
    }
    println!(
        "next: afetm-analyzer select --elf {} --weights {}{} --budget 10% --out plan.json",
        file.display(),
        weights.display(),
        if a.normal.is_zero() { String::new() } else { format!(" --db {} --normal-agent normal-{name}", db.display()) }
    );
    Ok(())
}
