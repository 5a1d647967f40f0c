//! `cargo xtask testbed up|down|status|load`: the NHSR-OSW shop from a run folder.
use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use testbed::{Config, load};

use crate::target_dir;

#[derive(Args, Clone)]
pub struct Where {
    /// Run folder: rendered configs, data, logs of every server, pid files.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// nginx port; Apache instances take the next ones, Redis base + 299.
    #[arg(long, default_value_t = 18080)]
    pub base_port: u16,
    /// Apache instances behind nginx (the paper uses 4).
    #[arg(long, default_value_t = 4)]
    pub apaches: usize,
    /// Tiers as separate hosts: L1, L2, L3 each in a network namespace of its own (veth pairs
    /// on a bridge, 10.203.N.0/24); `down` removes them. Use the same flag for every command.
    #[arg(long)]
    pub netns: bool,
}

impl Where {
    pub fn config(&self) -> Config {
        let mut c = Config::new(self.run_dir.clone().unwrap_or_else(|| target_dir().join("testbed")));
        c.base_port = self.base_port;
        c.apaches = self.apaches;
        c.netns = self.netns;
        c
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Build redis-server, nginx, httpd and libsqlite3 from Debian's sources with symbols and
    /// frame pointers into the cache (~/.cache/afetm/testbed-build), skipping finished builds.
    Build,
    /// Start redis, the Apache instances and nginx, wait until each answers, seed the shop.
    Up {
        #[command(flatten)]
        at: Where,
        /// Run the source builds (`testbed build`) instead of Debian's stock binaries.
        #[arg(long)]
        built: bool,
    },
    /// Stop exactly what `up` started (by pid and process group).
    Down {
        #[command(flatten)]
        at: Where,
    },
    /// Each server's pid, port, process count and health.
    Status {
        #[command(flatten)]
        at: Where,
        #[arg(long)]
        json: bool,
    },
    /// Weights for trace point selection: count every function of one server under the CRUD
    /// mix, write calls/s per function, then trace the called ones briefly for normal FCTs.
    Sample(crate::sample::SampleArgs),
    /// Run the CRUD mix against nginx and print latency and throughput.
    Load {
        #[command(flatten)]
        at: Where,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Total requests per second (fixed rate, coordinated-omission corrected); default:
        /// closed loop.
        #[arg(long)]
        rate: Option<f64>,
        /// Operation weights, e.g. find=60,search=10,buy=10,modify=8,add=7,delete=5
        #[arg(long)]
        mix: Option<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

pub fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Build => {
            for (pkg, dir, secs) in testbed::build::build_all(&testbed::build::cache_dir())? {
                let how = if secs == 0.0 { "cached".to_string() } else { format!("built in {secs:.0} s") };
                println!("{:<8} {how:<16} {}", pkg.source_name(), dir.display());
            }
            Ok(())
        }
        Cmd::Up { at, built } => {
            let mut cfg = at.config();
            if built {
                cfg.binaries = testbed::build::binaries(&testbed::build::cache_dir())
                    .ok_or_else(|| anyhow::anyhow!("source builds missing: run `cargo xtask testbed build`"))?;
            }
            match testbed::up(&cfg) {
                Ok(servers) => {
                    for s in servers {
                        println!("{:<8} pid {:<7} port {}", s.name, s.pid, s.port);
                    }
                    println!("shop: {}/shop.php   logs: {}", cfg.url(), cfg.logs_dir().display());
                    Ok(())
                }
                Err(e) => {
                    let stopped = testbed::down(&cfg).unwrap_or_default();
                    bail!("{e:#} (stopped what had started: {stopped:?})")
                }
            }
        }
        Cmd::Down { at } => {
            let stopped = testbed::down(&at.config())?;
            println!(
                "stopped: {}",
                if stopped.is_empty() { "nothing was running".to_string() } else { stopped.join(", ") }
            );
            Ok(())
        }
        Cmd::Status { at, json } => {
            let st = testbed::status(&at.config())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else if st.is_empty() {
                println!("nothing running in {}", at.config().run_dir.display());
            } else {
                println!("{:<8} {:>7} {:>6} {:>9} health", "server", "pid", "port", "processes");
                for s in st {
                    println!(
                        "{:<8} {:>7} {:>6} {:>9} {}",
                        s.name,
                        s.pid,
                        s.port,
                        s.processes,
                        if s.healthy { "ok" } else { "DOWN" }
                    );
                }
            }
            Ok(())
        }
        Cmd::Sample(a) => crate::sample::sample(a),
        Cmd::Load { at, connections, duration, warmup, rate, mix, seed, json } => {
            let cfg = at.config();
            cfg.check_reachable()?;
            let mut l = load::LoadConfig::new(cfg.url());
            l.connections = connections;
            l.duration = duration;
            l.warmup = warmup;
            l.rate = rate;
            l.seed = seed;
            l.items = cfg.seed_items;
            if let Some(m) = mix {
                l.mix = load::Mix::parse(&m)?;
            }
            let report = load::run(&l)?;
            println!("{}", report.text());
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            }
            Ok(())
        }
    }
}

/// Builds the shop's servers from source into the cache (skipping finished builds) and says
/// what it built; the demo and the evaluation start with it.
pub fn build_servers() -> anyhow::Result<()> {
    for (pkg, _, secs) in ::testbed::build::build_all(&::testbed::build::cache_dir())? {
        if secs > 0.0 {
            eprintln!("built {} in {secs:.0} s", pkg.source_name());
        }
    }
    Ok(())
}
