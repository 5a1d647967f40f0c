//! `cargo xtask demo`: afetm's purpose end to end on the shop's redis (source build).
//!
//! 1. a small fault injection campaign on redis ([`SCOPE`], a few minutes) fills an FDDB;
//! 2. the shop comes up, every function of redis is counted under the CRUD mix (weights) and
//!    the called ones traced briefly (normal FCTs): `cargo xtask testbed sample`'s steps;
//! 3. trace point selection at P = 10% (Alg. 1) with F^callstack from coloring (Alg. 2);
//! 4. the GCN is trained on the FDDB's colored, masked FCTs under that plan, and Chimera on the
//!    FDDB's logs;
//! 5. the analyzer serves with the model, an agent traces redis with the plan while the shop
//!    runs at the campaign's request rate, and a fault of the campaign ([`Chosen`]) is injected
//!    into the running redis:
//!    a fresh injection that training never saw;
//! 6. the stored diagnoses are printed (verdict, top-3, the AFCT with the suspect marked), the
//!    report of the window with the lowest P(normal) (symptoms from its logs, which the agent
//!    tails, the AFCT path, causes, similar FDDB runs, the SOP's steps), and whether its top-1
//!    names the injected fault.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    thread::sleep,
    time::{Duration, Instant},
};

use afetm_proto::{self as pb, query_client::QueryClient};
use anyhow::{Context, Result, bail};

use crate::{
    Guard,
    bench::{start_agent_with, stop_agent},
    cargo, run, target_dir,
};

/// The campaign's functions: one per command of the CRUD mix plus client set-up and replies,
/// so that the faults' trees differ in what they touch.
pub const SCOPE: &str =
    "functions:getGenericCommand,setGenericCommand,delGenericCommand,createClient,addReplyBulk,lookupKeyWrite";
/// Which fault the demo injects: one drawn with a printed seed (`cargo xtask demo --seed N`
/// draws it again) from what training never saw: the campaign's held-out specs of the trained
/// functions (another bit of an argument or of the return value, IP+N over two instructions)
/// plus the crash and the deadlock of every trained function (faults without a parameter, so
/// their spec is the trained one; a crashed or stopped thread is the hard case for a call tree).
/// Nothing here reads an evaluation run or prefers a fault the model does well on.
#[derive(Debug)]
struct Chosen {
    function: String,
    fault: String,
    kind: String,
    /// How many faults it was drawn from.
    candidates: usize,
}

const LISTEN: &str = "127.0.0.1:20074";
/// The shop's log files the demo's agent tails.
const LOG_FILES: [&str; 4] = ["redis.log", "php-error.log", "nginx-access.log", "nginx-error.log"];
const BASE_PORT: u16 = 22080;

fn step(n: u32, t0: Instant, what: &str) {
    println!("\n### {n}. {what}   [{:.0} s]\n", t0.elapsed().as_secs_f64());
}

fn analyzer_cmd(bin: &Path) -> Command {
    Command::new(bin.join("afetm-analyzer"))
}

pub fn run_demo(seed: Option<u64>) -> Result<()> {
    let t0 = Instant::now();
    run(&mut cargo(&["build", "--release", "--bins", "-p", "agent", "-p", "analyzer", "-p", "campaign"]))?;
    crate::testbed::build_servers()?;
    let bin = target_dir().join("release");
    let dir = target_dir().join("demo-redis");
    std::fs::create_dir_all(&dir)?;
    let fddb = dir.join("fddb.sqlite");

    step(1, t0, &format!("Fault injection campaign on redis, scope {SCOPE} (resumes if run before)"));
    run(Command::new(bin.join("afetm-campaign"))
        .args(["redis", "--scope", SCOPE, "--cap", "3", "--eval-runs", "0", "--normal-runs", "12", "--held-out", "0"])
        .arg("--db")
        .arg(&fddb)
        .arg("--work-dir")
        .arg(dir.join("campaign"))
        .arg("--bin-dir")
        .arg(&bin))?;
    let rate = campaign_rate(&fddb)?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
    });
    let chosen = choose_fault(&fddb, seed)?;
    println!(
        "the fault to inject, drawn with seed {seed} from {} held-out candidates (`cargo xtask demo --seed {seed}` draws it again): {} on {}",
        chosen.candidates, chosen.fault, chosen.function
    );

    step(2, t0, "The shop up; weights and normal FCTs of redis");
    let at = crate::testbed::Where { run_dir: Some(dir.join("shop")), base_port: BASE_PORT, apaches: 4, netns: false };
    let mut cfg = at.config();
    cfg.binaries = testbed::build::binaries(&testbed::build::cache_dir()).context("source builds missing")?;
    testbed::down(&cfg)?;
    let _shop = ShopGuard(cfg.clone());
    for s in testbed::up(&cfg)? {
        println!("{:<8} pid {:<7} port {}", s.name, s.pid, s.port);
    }
    let sample = dir.join("sample");
    crate::sample::sample(crate::sample::SampleArgs {
        target: crate::sample::Target::Redis,
        at: at.clone(),
        period: Duration::from_secs(10),
        connections: 8,
        // P is a share: scaling by work changes little but timers' weights; the demo keeps the
        // raw rates its model was validated with.
        baseline: Duration::ZERO,
        normal: Duration::from_secs(5),
        normal_rate: 20.0,
        out: Some(sample.clone()),
        build: false,
    })?;
    let redis = redis_binary(&cfg)?;

    step(3, t0, "Trace point selection at P = 10% (Alg. 1), F^callstack by coloring (Alg. 2)");
    let plan = dir.join("plan.json");
    run(analyzer_cmd(&bin)
        .args(["select", "--elf"])
        .arg(&redis)
        .arg("--weights")
        .arg(sample.join("redis.weights.json"))
        .arg("--db")
        .arg(sample.join("redis.sqlite"))
        .args(["--normal-agent", "normal-redis", "--budget", "10%", "--out"])
        .arg(&plan))?;

    step(4, t0, "Training the GCN on the FDDB's FCTs (colored and masked under the plan), and Chimera on its logs");
    let model = dir.join("model");
    run(analyzer_cmd(&bin)
        .args(["train", "--target", "redis", "--fddb"])
        .arg(&fddb)
        .arg("--plan")
        .arg(&plan)
        .arg("--out")
        .arg(&model))?;
    let logs_model = dir.join("logs-model");
    run(analyzer_cmd(&bin)
        .args(["train-logs", "--target", "redis", "--fddb"])
        .arg(&fddb)
        .arg("--out")
        .arg(&logs_model))?;

    step(
        5,
        t0,
        &format!("Diagnosis online: redis traced with the plan, {} injected into {}", chosen.fault, chosen.function),
    );
    let live = dir.join("live.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", live.display()));
    }
    let server = format!("http://{LISTEN}");
    let analyzer = analyzer_cmd(&bin)
        .args(["serve", "--listen", LISTEN, "--window", "1s", "--db"])
        .arg(&live)
        .arg("--model")
        .arg(&model)
        .arg("--log-model")
        .arg(&logs_model)
        .arg("--fddb")
        .arg(&fddb)
        .stderr(std::fs::File::create(dir.join("analyzer.log"))?)
        .spawn()
        .context("starting afetm-analyzer")?;
    let mut guard = Guard(vec![analyzer]);
    sleep(Duration::from_millis(700));
    // The agent tails the shop's logs beside the traces: the reports weigh them.
    let logs: Vec<String> = LOG_FILES.iter().map(|f| cfg.logs_dir().join(f).display().to_string()).collect();
    let extra: Vec<&str> = logs.iter().flat_map(|l| ["--log", l.as_str()]).collect();
    let (agent, agent_log) = start_agent_with(&bin, &plan, &server, &dir, None, "demo-redis", &extra)?;
    guard.0.push(agent);
    let pid = redis_pid(&cfg)?;
    let injected_at = live_run(&bin, &cfg, &redis, pid, rate, &dir, &chosen)?;
    stop_agent(guard.0.remove(1), &agent_log)?;

    step(6, t0, "The diagnoses");
    let verdict = report(&bin, &server, injected_at, &chosen)?;
    println!("\n{verdict}\ndemo finished in {:.0} s; files in {}", t0.elapsed().as_secs_f64(), dir.display());
    Ok(())
}

/// Stops the demo's shop however the demo ends.
pub(crate) struct ShopGuard(pub(crate) testbed::Config);

impl Drop for ShopGuard {
    fn drop(&mut self) {
        let _ = testbed::down(&self.0);
    }
}

/// The request rate the campaign ran at (stored with the target).
fn campaign_rate(fddb: &Path) -> Result<f64> {
    let fddb = afetm_fddb::Fddb::open(fddb)?;
    let id = fddb.target_id("redis")?.context("the campaign stored no redis target")?;
    let settings = fddb.settings(id)?.context("the campaign stored no settings")?;
    Ok(settings.rate)
}

/// See [`Chosen`].
fn choose_fault(fddb: &Path, seed: u64) -> Result<Chosen> {
    use rand::{RngExt, SeedableRng};
    let candidates: Vec<(String, afetm_fault::Fault)> = afetm_fddb::Fddb::open(fddb)?
        .faults_of("redis")?
        .into_iter()
        .filter(|(_, f, held)| match held {
            Some(h) => *h == afetm_fddb::HeldOut::Spec,
            None => f.ends_process(),
        })
        .map(|(function, f, _)| (function, f))
        .collect();
    if candidates.is_empty() {
        bail!("the campaign planned no held-out spec and no crash or deadlock of redis");
    }
    let i = rand::rngs::StdRng::seed_from_u64(seed).random_range(0..candidates.len());
    let (function, fault) = candidates[i].clone();
    Ok(Chosen { function, fault: fault.to_string(), kind: fault.kind().to_string(), candidates: candidates.len() })
}

fn redis_pid(cfg: &testbed::Config) -> Result<u32> {
    testbed::servers(cfg)?
        .into_iter()
        .find(|s| s.name.starts_with("redis"))
        .map(|s| s.pid)
        .context("redis is not running")
}

fn redis_binary(cfg: &testbed::Config) -> Result<PathBuf> {
    let pid = redis_pid(cfg)?;
    std::fs::read_link(format!("/proc/{pid}/exe")).with_context(|| format!("redis pid {pid} is gone"))
}

/// The CRUD mix at `rate` for 6 s, the fault injected into `pid` after 2 s. Returns the
/// injection's instant on the agent clock (CLOCK_MONOTONIC).
fn live_run(
    bin: &Path,
    cfg: &testbed::Config,
    redis: &Path,
    pid: u32,
    rate: f64,
    dir: &Path,
    chosen: &Chosen,
) -> Result<u64> {
    let mut l = testbed::load::LoadConfig::new(cfg.url());
    l.items = cfg.seed_items;
    l.connections = 4;
    l.rate = Some(rate);
    l.duration = Duration::from_secs(6);
    l.warmup = Duration::ZERO;
    let load = std::thread::spawn(move || testbed::load::run(&l));
    sleep(Duration::from_secs(2));
    let injected_at = testbed::monotonic_ns();
    let out = dir.join("inject.out");
    let mut inject =
        Guard(vec![crate::eval::start_inject(bin, dir, redis, pid, &chosen.function, &chosen.fault, &out)?]);
    let report = load.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    println!("load: {}", report.text());
    terminate(&mut inject.0[0]);
    // The run ends with its load, as a campaign run does (an idle window is not what the
    // model learnt: see README).
    Ok(injected_at)
}

pub(crate) fn terminate(child: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

/// Prints the diagnoses (with the AFCT of the worst window) and says whether the demo's top-1
/// named the injected fault.
fn report(bin: &Path, server: &str, injected_at: u64, chosen: &Chosen) -> Result<String> {
    let rt = tokio::runtime::Runtime::new()?;
    let diagnoses: Vec<pb::Diagnosis> = rt.block_on(async {
        let mut q = QueryClient::connect(server.to_string()).await.context("analyzer")?;
        let t = Instant::now();
        loop {
            let req = pb::ListDiagnosesRequest { agent_id: "demo-redis".into(), ..Default::default() };
            let got = q.list_diagnoses(req).await?.into_inner().diagnoses;
            if got.iter().any(|d| d.end_ns > injected_at) || t.elapsed() > Duration::from_secs(15) {
                return anyhow::Ok(got);
            }
            sleep(Duration::from_millis(300));
        }
    })?;
    if diagnoses.is_empty() {
        bail!("the analyzer stored no diagnosis (see its log)");
    }
    run(analyzer_cmd(bin).args(["diagnoses", "--server", server, "--agent", "demo-redis", "--last", "100"]))?;
    let after: Vec<&pb::Diagnosis> = diagnoses.iter().filter(|d| d.end_ns > injected_at).collect();
    let before = diagnoses.iter().filter(|d| d.end_ns <= injected_at);
    let false_alarms = before.clone().filter(|d| d.error).count();
    let worst = after
        .iter()
        .min_by(|a, b| a.p_normal.total_cmp(&b.p_normal))
        .context("no window after the injection was diagnosed")?;
    println!("\nThe window with the lowest P(normal) after the injection, its AFCT with the suspect marked:\n");
    run(analyzer_cmd(bin).args(["diagnoses", "--server", server, "--window", &worst.window_id.to_string(), "--tree"]))?;
    println!("\nIts report (afetm-analyzer report --window {}):\n", worst.window_id);
    run(analyzer_cmd(bin).args(["report", "--server", server, "--window", &worst.window_id.to_string()]))?;
    let top1 = worst.top.first().map(|s| (s.kind.as_str(), s.function.as_str()));
    let function_right = top1.is_some_and(|(_, f)| f == chosen.function);
    let kind_right = top1.is_some_and(|(k, _)| k == chosen.kind);
    let in_top3 = worst.top.iter().take(3).any(|s| s.function == chosen.function);
    let first_alarm = after.iter().filter(|d| d.error).map(|d| d.end_ns).min();
    let when = match first_alarm {
        Some(end) => format!(
            "the first alarm came in a window after the injection (it ended {:.1} s after it)",
            (end - injected_at) as f64 / 1e9
        ),
        None => "no window after the injection alarmed: the fault was NOT detected".into(),
    };
    Ok(format!(
        "injected {}@{}; {when}; least normal window after it: verdict {} (P(normal) {:.3}); top-1 {}: function {}, fault kind {}; the injected function is {} the top-3; windows before the injection: {} ({} false alarms)",
        chosen.fault,
        chosen.function,
        if worst.error { "ERROR" } else { "no alarm" },
        worst.p_normal,
        top1.map(|(k, f)| format!("{k}@{f}")).unwrap_or_else(|| "none".into()),
        if function_right { "RIGHT" } else { "WRONG" },
        if kind_right { "RIGHT" } else { "WRONG" },
        if in_top3 { "in" } else { "not in" },
        before.count(),
        false_alarms
    ))
}
