//! `afetm-campaign`: runs (or resumes) the fault injection campaign on the testbed for one or
//! all targets, fills the FDDB, and prints each target's figures. Root (it loads eBPF programs
//! and starts the shop).
use std::{path::PathBuf, time::Duration};

use afetm_campaign::{
    plan::Scope,
    runner::{self, Target},
};
use afetm_fddb::{Fddb, Phases};
use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(name = "afetm-campaign", version, about = "Fault injection campaign on the NHSR-OSW shop; fills the FDDB")]
struct Cli {
    /// redis, nginx, httpd, sqlite, or all four.
    target: String,
    /// Which activated functions: all, paper-sample, top:N (most called), random:N:SEED,
    /// functions:F1,F2.
    #[arg(long, default_value = "top:5")]
    scope: Scope,
    /// The FDDB (SQLite; created if missing, resumed if there).
    #[arg(long, default_value = "fddb.sqlite")]
    db: PathBuf,
    /// Working folder (per target: stack run folder, analyzer database, logs).
    #[arg(long, default_value = "campaign")]
    work_dir: PathBuf,
    /// Where afetm-agent, afetm-analyzer and afetm-inject are (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 21080)]
    base_port: u16,
    /// Workload per run after its fault-free lead: the fault is permanent, so a run gives a
    /// faulty window per analyzer window (1 s) of it, up to three by default (issue 23, item 4).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Training runs per fault at most (fewer when one adds no FCT new for the fault).
    #[arg(long, default_value_t = 3)]
    cap: usize,
    /// Evaluation runs per fault after its training runs, and normal evaluation runs: held out
    /// for the evaluation, never for training.
    #[arg(long, default_value_t = 1)]
    eval_runs: usize,
    /// Normal evaluation runs (default: --eval-runs): the false alarm rate is measured on them.
    #[arg(long)]
    normal_eval_runs: Option<usize>,
    /// Normal training runs.
    #[arg(long, default_value_t = 3)]
    normal_runs: usize,
    /// Count-mode sampling that finds the activated functions.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    sample: Duration,
    /// Debian's stock binaries (no DWARF: no interface faults) instead of the source builds.
    #[arg(long)]
    stock: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many faults per target (the rest stays pending).
    #[arg(long)]
    max_faults: Option<usize>,
    /// Client connections of the workload.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Fixed request rate (req/s); default: the highest at which full tracing loses nothing,
    /// found when a target's campaign starts and stored with it.
    #[arg(long)]
    rate: Option<f64>,
    /// Sample and plan, print the plan's size, and stop (for sizing a scope: use a scratch --db,
    /// the plan stays in it).
    #[arg(long)]
    plan_only: bool,
    /// A run still going after this long is ended (target killed, recorded as a hang).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    fault_timeout: Duration,
    /// Share of the scope's functions held out of training: all their faults get evaluation
    /// runs only (scored as "unseen function"); rounded down, at least one function is trained.
    /// Every parameterised training fault also gets one unseen spec (another bit, IP+N over two
    /// instructions) with evaluation runs only.
    #[arg(long, default_value_t = 0.2)]
    held_out: f64,
}

fn quantile(mut v: Vec<u64>, q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn median_phases(t: &[(Phases, u64)]) -> Phases {
    let m = |f: fn(&Phases) -> u64| quantile(t.iter().map(|(p, _)| f(p)).collect(), 0.5);
    Phases {
        restart_ms: m(|p| p.restart_ms),
        inject_ms: m(|p| p.inject_ms),
        load_ms: m(|p| p.load_ms),
        collect_ms: m(|p| p.collect_ms),
    }
}

fn run(cli: Cli) -> Result<()> {
    let targets: Vec<Target> = match cli.target.as_str() {
        "all" => vec![Target::Redis, Target::Nginx, Target::Httpd, Target::Sqlite],
        t => vec![<Target as clap::ValueEnum>::from_str(t, true).map_err(|e| anyhow::anyhow!("target {t:?}: {e}"))?],
    };
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("program directory")?.to_path_buf(),
    };
    if let Some(d) = cli.db.parent() {
        std::fs::create_dir_all(d)?;
    }
    for t in targets {
        let cfg = runner::Config {
            target: t,
            work_dir: cli.work_dir.join(t.name()),
            base_port: cli.base_port,
            built: !cli.stock,
            bin_dir: bin_dir.clone(),
            db: cli.db.clone(),
            scope: cli.scope.clone(),
            seed: cli.seed,
            window: cli.window,
            cap: cli.cap,
            eval_runs: cli.eval_runs,
            normal_eval_runs: cli.normal_eval_runs.unwrap_or(cli.eval_runs),
            normal_runs: cli.normal_runs,
            sample: cli.sample,
            connections: cli.connections,
            rate: cli.rate,
            max_faults: cli.max_faults,
            plan_only: cli.plan_only,
            slow_factor: 2.0,
            fault_timeout: cli.fault_timeout,
            held_out_share: cli.held_out,
        };
        let out = runner::run(&cfg, std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_context(|| format!("campaign on {}", t.name()))?;
        let fddb = Fddb::open(&cli.db)?;
        let id = fddb.target_id(t.name())?.context("target missing from the FDDB")?;
        let s = fddb.summary(id)?;
        let walls: Vec<u64> = out.timings.iter().map(|(_, w)| *w).collect();
        let p = median_phases(&out.timings);
        println!(
            "{}: {} functions traced, {} in scope, {} faults ({} done, {} pending) {:?}; rate {:.0} req/s; \
             {} runs this time in {:.0} s, {:.2} s per run (median; p90 {:.2}; phases restart {} / inject {} / load {} / collect {} ms); \
             runs {:?}, not activated {:?}; unique FCTs {} ({} normal, {} truncated, nodes mean {:.0} max {}), \
             new per fault mean {:.2} max {}; \
             faulty trees {} ({} normal-like); manifestations {:?}",
            t.name(),
            s.traced,
            s.functions,
            s.faults,
            s.faults_done,
            out.pending,
            s.faults_by_kind,
            out.rate,
            out.runs,
            out.wall.as_secs_f64(),
            quantile(walls.clone(), 0.5) as f64 / 1000.0,
            quantile(walls, 0.9) as f64 / 1000.0,
            p.restart_ms,
            p.inject_ms,
            p.load_ms,
            p.collect_ms,
            s.runs_by_role_status,
            s.not_activated_by_kind,
            s.unique_fcts,
            s.normal_fcts,
            s.truncated_fcts,
            s.fct_nodes_mean,
            s.fct_nodes_max,
            s.fcts_per_fault_mean,
            s.fcts_per_fault_max,
            s.faulty_trees,
            s.normal_like_trees,
            s.manifestations
        );
    }
    let size = std::fs::metadata(&cli.db).map(|m| m.len()).unwrap_or(0);
    println!("FDDB: {} ({:.1} MiB)", cli.db.display(), size as f64 / (1 << 20) as f64);
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("afetm-campaign: {e:#}");
        std::process::exit(1);
    }
}
