//! `cargo xtask bench rtgr`: what tracing costs the shop, per target, at each budget and with
//! full tracing, on the measurement of `crate::rtgr` (the evaluation's Table I), plus:
//! - the plan selected the pre-cost way (P of calls, agent copying stacks) as the "before";
//! - plans selected with the host's calibrated probe costs (`afetm-agent --calibrate`, cached
//!   in `target/probe-costs.json`) and weights scaled by work (calls per request at the
//!   untraced rate) as the "after";
//! - the agents' and the analyzer's CPU per million events, cores the agent used, kernel drops;
//! - the plan's predicted events against those the agent received, per request served;
//! - with `--target all`, the four targets' plans traced at once.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    cargo,
    demo_diagnosis::ShopGuard,
    rtgr::{self, Condition, Row},
    run,
    sample::Target,
    target_dir,
};

const BASE_PORT: u16 = 19580;
const LISTEN: &str = "127.0.0.1:20077";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    Redis,
    Nginx,
    Httpd,
    Sqlite,
    All,
}

pub struct Args {
    pub target: Which,
    pub budgets: Vec<String>,
    pub reps: usize,
    pub seconds: u64,
    pub built: bool,
    pub recalibrate: bool,
    /// Also a plan bounded by `select --max-overhead` (share of a core).
    pub max_overhead: Option<String>,
    /// With `all`: only the four targets traced at once, with the plans of the last run.
    pub together_only: bool,
}

/// The host's probe costs, measured once and cached.
pub fn probe_costs(bin: &Path, fresh: bool) -> Result<PathBuf> {
    let path = target_dir().join("probe-costs.json");
    if fresh || !path.is_file() {
        run(Command::new(bin.join("afetm-agent")).arg("--calibrate").arg(&path))?;
    }
    Ok(path)
}

fn tname(t: Target) -> String {
    format!("{t:?}").to_lowercase()
}

pub fn rtgr_bench(a: Args) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--workspace", "--bins"]))?;
    let bin = target_dir().join("release");
    let out = target_dir().join("bench-rtgr");
    std::fs::create_dir_all(&out)?;
    let costs = probe_costs(&bin, a.recalibrate)?;
    println!("probe costs: {}", std::fs::read_to_string(&costs)?.split_whitespace().collect::<Vec<_>>().join(" "));
    let at = crate::testbed::Where { run_dir: Some(out.join("shop")), base_port: BASE_PORT, apaches: 4, netns: false };
    let mut cfg = at.config();
    if a.built {
        cfg.binaries = testbed::build::binaries(&testbed::build::cache_dir())
            .context("source builds missing: run `cargo xtask testbed build`")?;
    }
    testbed::down(&cfg)?;
    let _shop = ShopGuard(cfg.clone());
    testbed::up(&cfg)?;
    let targets: Vec<Target> = match a.target {
        Which::Redis => vec![Target::Redis],
        Which::Nginx => vec![Target::Nginx],
        Which::Httpd => vec![Target::Httpd],
        Which::Sqlite => vec![Target::Sqlite],
        Which::All => vec![Target::Redis, Target::Nginx, Target::Httpd, Target::Sqlite],
    };
    let mut all_rows = Vec::new();
    let mut first_plans = Vec::new();
    for t in &targets {
        if a.together_only {
            let plan = out.join(tname(*t)).join(format!("plan-{}.json", a.budgets[0].trim_end_matches('%')));
            anyhow::ensure!(plan.is_file(), "{} missing: run without --together-only first", plan.display());
            first_plans.push(plan);
            continue;
        }
        let (rows, first) = one_target(&a, &cfg, &at, &bin, &out, &costs, *t)?;
        print_rows(&rows, &out.join(tname(*t)))?;
        all_rows.extend(rows);
        first_plans.push(first);
    }
    if a.target == Which::All {
        let mut conds = vec![
            Condition::new("untraced", vec![]),
            Condition::new(format!("all four P={}", a.budgets[0]), first_plans),
        ];
        if let Some(x) = &a.max_overhead {
            let plans: Vec<PathBuf> =
                targets.iter().map(|t| out.join(tname(*t)).join("plan-max-overhead.json")).collect();
            if plans.iter().all(|p| p.is_file()) {
                conds.push(Condition::new(format!("all four max overhead {x}"), plans));
            }
        }
        let setup = setup(&a, &cfg, &bin, &out, None);
        let rows = rtgr::measure(&setup, "all", &conds)?;
        print_rows(&rows, &out)?;
        all_rows.extend(rows);
    }
    let name = if a.together_only { "rtgr-together.json" } else { "rtgr.json" };
    std::fs::write(out.join(name), serde_json::to_string_pretty(&all_rows)?)?;
    println!("\nevery repetition: {}", out.join(name).display());
    Ok(())
}

fn setup<'a>(
    a: &Args,
    cfg: &'a testbed::Config,
    bin: &'a Path,
    dir: &'a Path,
    tier: Option<Target>,
) -> rtgr::Setup<'a> {
    rtgr::Setup { cfg, bin, dir, tier, listen: LISTEN, reps: a.reps, load_for: Duration::from_secs(a.seconds) }
}

/// Sampling, plans and the measurement of one target; returns its rows and its first budget's
/// plan (for the all-at-once run).
fn one_target(
    a: &Args,
    cfg: &testbed::Config,
    at: &crate::testbed::Where,
    bin: &Path,
    out: &Path,
    costs: &Path,
    t: Target,
) -> Result<(Vec<Row>, PathBuf)> {
    let tn = tname(t);
    let dir = out.join(&tn);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sample = dir.join("sample");
    crate::sample::sample(crate::sample::SampleArgs {
        target: t,
        at: at.clone(),
        period: Duration::from_secs(10),
        connections: 8,
        baseline: Duration::from_secs(5),
        normal: Duration::from_secs(5),
        normal_rate: 20.0,
        out: Some(sample.clone()),
        build: false,
    })?;
    let file = crate::sample::target_file(cfg, t)?;
    let select = |budget: &str, costs: Option<&Path>, plan: &Path, extra: &[&str]| -> Result<()> {
        let mut cmd = Command::new(bin.join("afetm-analyzer"));
        cmd.args(["select", "--elf"])
            .arg(&file)
            .arg("--weights")
            .arg(sample.join(format!("{tn}.weights.json")))
            .arg("--db")
            .arg(sample.join(format!("{tn}.sqlite")))
            .args(["--normal-agent", &format!("normal-{tn}"), "--budget", budget, "--out"])
            .arg(plan);
        if let Some(c) = costs {
            cmd.arg("--costs").arg(c);
        }
        run(cmd.args(extra))
    };
    let before = dir.join("plan-before.json");
    select(&a.budgets[0], None, &before, &[])?;
    let mut conds = vec![
        Condition::new("untraced", vec![]),
        Condition {
            stack_copies: true,
            ..Condition::new(format!("P={} before (calls, stack copies)", a.budgets[0]), vec![before])
        },
    ];
    let mut first = None;
    for b in &a.budgets {
        let plan = dir.join(format!("plan-{}.json", b.trim_end_matches('%')));
        select(b, Some(costs), &plan, &[])?;
        first.get_or_insert_with(|| plan.clone());
        conds.push(Condition::new(format!("P={b}"), vec![plan]));
    }
    if let Some(x) = &a.max_overhead {
        let plan = dir.join("plan-max-overhead.json");
        select(&a.budgets[0], Some(costs), &plan, &["--max-overhead", x])?;
        conds.push(Condition::new(format!("max overhead {x} of a core"), vec![plan]));
    }
    conds.push(Condition::new("full", vec![rtgr::full_plan(&dir, &file)?]));
    let rows = rtgr::measure(&setup(a, cfg, bin, &dir, Some(t)), &tn, &conds)?;
    Ok((rows, first.context("no budget given")?))
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    (!s.is_empty()).then(|| s[s.len() / 2])
}

fn growth(v: &[f64], base: &[f64]) -> String {
    match (median(v), median(base)) {
        (Some(x), Some(b)) if b > 0.0 => format!("{:+.0}%", 100.0 * (x / b - 1.0)),
        _ => "-".into(),
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// Events per request the plan predicts: its predicted events/s over the request rate the
/// weights were scaled to (raw sampled rates when the weights were not scaled).
fn predicted_per_request(plan_dir: &Path, condition: &str) -> Option<f64> {
    let plan_file = if condition.starts_with("max overhead") {
        "plan-max-overhead.json".to_string()
    } else if condition.contains("before") {
        "plan-before.json".to_string()
    } else {
        format!("plan-{}.json", condition.strip_prefix("P=")?.split_whitespace().next()?.trim_end_matches('%'))
    };
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(plan_dir.join(plan_file)).ok()?).ok()?;
    let events = plan["selection"]["predicted"]["events_per_s"].as_f64()?;
    let tn = plan_dir.file_name()?.to_string_lossy().into_owned();
    let w: serde_json::Value =
        serde_json::from_slice(&std::fs::read(plan_dir.join("sample").join(format!("{tn}.weights.json"))).ok()?)
            .ok()?;
    let rps = w["sampling"]["real_rps"].as_f64()?;
    Some(events / rps)
}

fn print_rows(rows: &[Row], plan_dir: &Path) -> Result<()> {
    let Some(base) = rows.iter().find(|r| r.condition == "untraced") else {
        return Ok(());
    };
    println!(
        "\n{:<6} {:<40} {:>14} {:>14} {:>12} {:>9} {:>9} {:>14} {:>8} {:>9} {:>9} {:>7}",
        "target",
        "condition",
        "tier us (RTGR)",
        "e2e ms (RTGR)",
        "r-bench ms",
        "req/s",
        "ev/req",
        "predicted/req",
        "stacks",
        "agent CPU",
        "s/1M ev",
        "drops"
    );
    for r in rows {
        let secs: f64 = r.seconds.iter().sum();
        let events: u64 = r.events.iter().sum();
        let requests: f64 = r.load_requests.iter().sum();
        let load_events: u64 = r.load_events.iter().sum();
        let cpu: f64 = r.agent_cpu_s.iter().sum();
        let an: f64 = r.analyzer_cpu_s.iter().sum();
        let per_m = |c: f64| {
            if events > 0 {
                format!("{:.2}+{:.2}", c / events as f64 * 1e6, an / events as f64 * 1e6)
            } else {
                "-".into()
            }
        };
        let stacks: u64 = r.stack_events.iter().sum();
        println!(
            "{:<6} {:<40} {:>14} {:>14} {:>12} {:>9.0} {:>9} {:>14} {:>8} {:>9} {:>9} {:>7}",
            r.target,
            r.condition,
            format!("{} ({})", fmt(median(&r.tier_us), 1), growth(&r.tier_us, &base.tier_us)),
            format!("{} ({})", fmt(median(&r.e2e_ms), 2), growth(&r.e2e_ms, &base.e2e_ms)),
            format!("{} ({})", fmt(median(&r.bench_ms), 3), growth(&r.bench_ms, &base.bench_ms)),
            median(&r.rps).unwrap_or(0.0),
            if load_events > 0 && requests > 0.0 {
                format!("{:.1}", load_events as f64 / requests)
            } else {
                "-".into()
            },
            fmt(predicted_per_request(plan_dir, &r.condition), 1),
            if events > 0 { format!("{:.0}%", 100.0 * stacks as f64 / events as f64) } else { "-".into() },
            if secs > 0.0 && events > 0 { format!("{:.3} core", cpu / secs) } else { "-".into() },
            per_m(cpu),
            r.kernel_drops.iter().sum::<u64>()
        );
    }
    println!(
        "(s/1M ev: agent + analyzer CPU seconds per million events; ev/req: events the agents received per request served; spread: see rtgr.json)"
    );
    println!(
        "\n{:<6} {:<40} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>10} {:>10}",
        "target", "condition", "events", "drain", "unwind", "cut", "reader", "agent proc", "analyzer", "demotions"
    );
    for r in rows.iter().filter(|r| r.events.iter().sum::<u64>() > 0) {
        let events: u64 = r.events.iter().sum();
        let per_m = |ms: &[u64]| format!("{:.2}", ms.iter().sum::<u64>() as f64 / 1000.0 / events as f64 * 1e6);
        let an: f64 = r.analyzer_cpu_s.iter().sum();
        println!(
            "{:<6} {:<40} {:>10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>10.2} {:>10}",
            r.target,
            r.condition,
            events,
            per_m(&r.drain_ms),
            per_m(&r.unwind_ms),
            per_m(&r.cut_ms),
            per_m(&r.reader_cpu_ms),
            per_m(&r.process_cpu_ms),
            an / events as f64 * 1e6,
            r.demotions.iter().sum::<u64>()
        );
    }
    println!(
        "(seconds per million events: the reader's wall time draining the ring (symbolization included), unwinding stack copies, cutting batches; reader thread CPU; agent process CPU (reader + transport + encoding); analyzer CPU)"
    );
    Ok(())
}
