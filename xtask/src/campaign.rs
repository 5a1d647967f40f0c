//! `cargo xtask campaign <redis|nginx|httpd|sqlite|all>`: the fault injection campaign on the
//! testbed (`afetm_analyzer::campaign::runner`), then per target the FDDB's figures.
use std::{path::PathBuf, time::Duration};

use afetm_analyzer::{
    campaign::{
        Scope,
        runner::{self, Target},
    },
    fddb::Fddb,
};
use anyhow::{Context, Result};
use clap::Args;

use crate::{cargo, root, run};

#[derive(Args)]
pub struct CampaignArgs {
    /// redis, nginx, httpd, sqlite, or all four.
    pub target: String,
    /// Which activated functions: all, top:N (most called), random:N:SEED.
    #[arg(long, default_value = "top:5")]
    pub scope: Scope,
    /// The FDDB (SQLite; created if missing, resumed if there).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Workload per run.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Injections per fault at most (stops earlier when one adds no new FCT).
    #[arg(long, default_value_t = 3)]
    pub cap: usize,
    #[arg(long, default_value_t = 2)]
    pub normal_runs: usize,
    /// Count-mode sampling that finds the activated functions.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sample: Duration,
    /// Debian's stock binaries (no DWARF: no interface faults) instead of the source builds.
    #[arg(long)]
    pub stock: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stop after this many faults per target (the rest stays pending).
    #[arg(long)]
    pub max_faults: Option<usize>,
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// A run still going after this long is ended (target killed, recorded as a hang).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub fault_timeout: Duration,
}

pub fn campaign(a: CampaignArgs) -> Result<()> {
    let targets: Vec<Target> = match a.target.as_str() {
        "all" => vec![Target::Redis, Target::Nginx, Target::Httpd, Target::Sqlite],
        t => vec![<Target as clap::ValueEnum>::from_str(t, true).map_err(|e| anyhow::anyhow!("target {t:?}: {e}"))?],
    };
    run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer"]))?;
    if !a.stock {
        for (pkg, _, secs) in testbed::build::build_all(&testbed::build::cache_dir())? {
            if secs > 0.0 {
                eprintln!("built {} in {secs:.0} s", pkg.source_name());
            }
        }
    }
    let db = a.db.clone().unwrap_or_else(|| root().join("target/campaign/fddb.sqlite"));
    if let Some(d) = db.parent() {
        std::fs::create_dir_all(d)?;
    }
    for t in targets {
        let cfg = runner::Config {
            target: t,
            work_dir: root().join("target/campaign").join(t.name()),
            base_port: 21080,
            built: !a.stock,
            bin_dir: root().join("target/release"),
            db: db.clone(),
            scope: a.scope.clone(),
            seed: a.seed,
            window: a.window,
            cap: a.cap,
            normal_runs: a.normal_runs,
            sample: a.sample,
            connections: a.connections,
            max_faults: a.max_faults,
            slow_factor: 2.0,
            fault_timeout: a.fault_timeout,
        };
        let out = runner::run(&cfg, true).with_context(|| format!("campaign on {}", t.name()))?;
        let fddb = Fddb::open(&db)?;
        let id = fddb.target_id(t.name())?.context("target missing from the FDDB")?;
        let s = fddb.summary(id)?;
        println!(
            "{}: {} functions, {} faults ({} done, {} pending) {:?}; {} runs this time in {:.0} s ({:.1} s per run); unique FCTs {} ({} normal), per fault mean {:.2} max {}; manifestations {:?}",
            t.name(),
            s.functions,
            s.faults,
            s.faults_done,
            out.pending,
            s.faults_by_kind,
            out.runs,
            out.wall.as_secs_f64(),
            out.wall.as_secs_f64() / out.runs.max(1) as f64,
            s.unique_fcts,
            s.normal_fcts,
            s.fcts_per_fault_mean,
            s.fcts_per_fault_max,
            s.manifestations
        );
    }
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    println!("FDDB: {} ({:.1} MiB)", db.display(), size as f64 / (1 << 20) as f64);
    Ok(())
}
