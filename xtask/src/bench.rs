//! `cargo xtask bench ...`: figures as ratios to a baseline taken in the same run (these
//! machines are noisy; absolute numbers only mean something next to their baseline).
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::target_dir;
use crate::{Guard, cargo, root, run};

#[derive(Subcommand, Clone)]
pub enum Which {
    /// ns per call of a probed function (no probe; afetm count = bare probe; afetm event;
    /// afetm callstack; bpftrace count) for an emulated and a single-stepped entry instruction,
    /// then events/s through agent -> gRPC -> analyzer -> AFCT with one core each.
    Probe {
        /// Calls per probed measurement.
        #[arg(long, default_value_t = 300_000)]
        calls: u64,
        /// Repetitions per measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// One MMAS trace point selection (Alg. 1) on a redis-sized instance, next to greedy.
    Select {
        #[arg(long, default_value_t = 4300)]
        functions: usize,
        #[arg(long, default_value_t = 40_000)]
        blocks: usize,
    },
    /// Live plan changes on redis-server: attach and detach 100, 1,000 and all functions,
    /// idle and under redis-benchmark, next to a no-op plan change.
    Attach {
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// The shop under the CRUD mix at 8 connections, untraced and then with the four servers
    /// traced on request-path functions: req/s and latency both ways, events/s and AFCTs/s at
    /// the analyzer.
    Testbed {
        /// Run on the source builds (`cargo xtask testbed build`).
        #[arg(long)]
        built: bool,
        /// Tiers in network namespaces.
        #[arg(long)]
        netns: bool,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// What tracing costs the shop: per target untraced, the pre-cost plan (P of calls, stack
    /// copies), plans selected with the host's probe costs at each budget, and full tracing,
    /// interleaved and repeated; tier and end-to-end RTGR, agent and analyzer CPU per million
    /// events, predicted against received events; `all` adds the four plans traced at once.
    Rtgr {
        #[arg(long, value_enum, default_value_t = crate::bench_rtgr::Which::Redis)]
        target: crate::bench_rtgr::Which,
        /// Budgets P, comma separated (the first is also the "before" plan's and the
        /// all-at-once run's).
        #[arg(long, value_delimiter = ',', default_value = "10%")]
        budget: Vec<String>,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Seconds of load per run (after 1 s of warm-up).
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Run on the source builds (`cargo xtask testbed build`) instead of Debian's binaries.
        #[arg(long)]
        built: bool,
        /// Measure the probe costs again instead of using target/probe-costs.json.
        #[arg(long)]
        recalibrate: bool,
        /// Also measure a plan bounded by `select --max-overhead` (share of one core), e.g. 2%.
        #[arg(long)]
        max_overhead: Option<String>,
        /// With `--target all`: only the four targets traced at once, with the plans the last
        /// run selected (target/bench-rtgr/<target>/).
        #[arg(long)]
        together_only: bool,
    },
    /// Online diagnosis: diagnoses per second, window close -> stored diagnosis p50/p99 and
    /// the analyzer's RSS with four models loaded, against the same daemon without models.
    Diagnose {
        /// Traced processes (one window per process and second).
        #[arg(long, default_value_t = 8)]
        procs: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

pub fn run_bench(which: Which) -> Result<()> {
    match which {
        Which::Probe { calls, reps } => probe(calls, reps),
        Which::Select { functions, blocks } => select_bench(functions, blocks),
        Which::Attach { reps } => crate::attach::attach_bench(reps),
        Which::Testbed { built, netns, duration } => testbed_bench(built, netns, duration),
        Which::Diagnose { procs, seconds } => crate::bench_diagnose::diagnose_bench(procs, seconds),
        Which::Rtgr { target, budget, reps, seconds, built, recalibrate, max_overhead, together_only } => {
            crate::bench_rtgr::rtgr_bench(crate::bench_rtgr::Args {
                target,
                budgets: budget,
                reps,
                seconds,
                built,
                recalibrate,
                max_overhead,
                together_only,
            })
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
}

fn measure(prog: &Path, which: &str, calls: u64, reps: usize) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..reps {
        let out = Command::new(prog).args([which, &calls.to_string()]).output()?;
        v.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().context("probebench output")?);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn start_agent(bin: &Path, plan: &Path, server: &str, dir: &Path, pin: Option<&str>) -> Result<(Child, PathBuf)> {
    start_agent_as(bin, plan, server, dir, pin, "bench")
}

pub fn start_agent_as(
    bin: &Path,
    plan: &Path,
    server: &str,
    dir: &Path,
    pin: Option<&str>,
    id: &str,
) -> Result<(Child, PathBuf)> {
    start_agent_with(bin, plan, server, dir, pin, id, &[])
}

/// The agent arguments that turn the kernel's unwinding off (call stacks copied).
pub const STACK_COPIES: [&str; 2] = ["--kernel-unwind", "false"];

/// An agent as [`start_agent_as`], with `extra` arguments ([`STACK_COPIES`], `--log FILE`).
pub fn start_agent_with(
    bin: &Path,
    plan: &Path,
    server: &str,
    dir: &Path,
    pin: Option<&str>,
    id: &str,
    extra: &[&str],
) -> Result<(Child, PathBuf)> {
    let ready = dir.join(format!("{id}.ready"));
    let log = dir.join(format!("{id}.log"));
    let _ = std::fs::remove_file(&ready);
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(bin.join("afetm-agent"));
            c
        }
        None => Command::new(bin.join("afetm-agent")),
    };
    let mut child = cmd
        .arg("--plan")
        .arg(plan)
        .args(["--analyzer", server, "--agent-id", id, "--ready-file"])
        .arg(&ready)
        .args(extra)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let t = Instant::now();
    while !ready.exists() {
        if child.try_wait()?.is_some() || t.elapsed() > Duration::from_secs(30) {
            bail!("agent did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        sleep(Duration::from_millis(20));
    }
    Ok((child, log))
}

pub fn stop_agent(mut child: Child, log: &Path) -> Result<String> {
    signal(&child, "-TERM");
    child.wait()?;
    Ok(std::fs::read_to_string(log).unwrap_or_default())
}

fn start_analyzer(bin: &Path, dir: &Path, listen: &str, pin: Option<&str>) -> Result<Child> {
    start_analyzer_at(bin, dir, &dir.join("bench.sqlite"), listen, pin)
}

/// An analyzer (1 s windows) on a fresh database `db`, logging into `dir`.
pub fn start_analyzer_db(bin: &Path, dir: &Path, db: &Path, listen: &str) -> Result<Child> {
    start_analyzer_at(bin, dir, db, listen, None)
}

fn start_analyzer_at(bin: &Path, dir: &Path, db: &Path, listen: &str, pin: Option<&str>) -> Result<Child> {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let mut cmd = match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(bin.join("afetm-analyzer"));
            c
        }
        None => Command::new(bin.join("afetm-analyzer")),
    };
    let log = dir.join("analyzer.log");
    let mut child = cmd
        .args(["serve", "--listen", listen, "--window", "1s", "--db"])
        .arg(db)
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    sleep(Duration::from_millis(500));
    if let Some(status) = child.try_wait()? {
        bail!("analyzer exited at start ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default().trim());
    }
    Ok(child)
}

pub fn analyzer_events(bin: &Path, server: &str) -> Result<u64> {
    let out = Command::new(bin.join("afetm-analyzer")).args(["stats", "--server", server]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("events: ").map(|v| v.trim_end_matches(',').parse::<u64>()))
        .context("no events counter in analyzer stats")?
        .context("bad events counter")
}

fn bpftrace(prog: &Path, func: &str, which: &str, calls: u64, reps: usize) -> Result<f64> {
    let mut child = Command::new("bpftrace")
        .args(["-e", &format!("uprobe:{}:{func} {{ @c = count(); }}", prog.display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    let stdout = child.stdout.take().context("bpftrace stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("Attaching") => break,
            Some(Ok(_)) => {}
            _ => bail!("bpftrace did not attach"),
        }
    }
    sleep(Duration::from_millis(300));
    let ns = measure(prog, which, calls, reps);
    signal(&child, "-INT");
    let _ = child.wait();
    ns
}

fn probe(calls: u64, reps: usize) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--workspace", "--bins"]))?;
    let bin = target_dir().join("release");
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let prog = dir.join("probebench");
    run(Command::new("gcc").args(["-O2", "-o"]).arg(&prog).arg(root().join("testbed/progs/probebench.c")))?;
    let listen = "127.0.0.1:20081";
    let server = format!("http://{listen}");
    let mut guard = Guard(vec![start_analyzer(&bin, &dir, listen, None)?]);

    let free_calls = calls * 20;
    let mut rows: Vec<(String, f64, f64)> =
        vec![("no probe".into(), measure(&prog, "emu", free_calls, reps)?, measure(&prog, "ss", free_calls, reps)?)];
    let mut placement = String::new();
    for (mode, label) in [
        ("count", "afetm count (bare probe)"),
        ("event", "afetm event"),
        ("callstack", "afetm callstack"),
        ("callstack", "afetm callstack (copy)"),
    ] {
        let plan = dir.join(format!("{mode}.json"));
        std::fs::write(
            &plan,
            format!(
                r#"{{"target":{{"path":"{}"}},"points":[{{"function":"emu_fn","mode":"{mode}"}},{{"function":"ss_fn","mode":"{mode}"}}]}}"#,
                prog.display()
            ),
        )?;
        if placement.is_empty() {
            placement = String::from_utf8_lossy(
                &Command::new(bin.join("afetm-agent")).arg("--plan").arg(&plan).arg("--dry-run").output()?.stdout,
            )
            .into_owned();
        }
        // The copy row is the call-stack event as it was before kernel unwinding (8 KiB copied).
        let copy = label.ends_with("(copy)");
        let extra: &[&str] = if copy { &STACK_COPIES } else { &[] };
        let (agent, log) = start_agent_with(&bin, &plan, &server, &dir, None, "bench", extra)?;
        let emu = measure(&prog, "emu", calls, reps)?;
        let ss = measure(&prog, "ss", calls, reps)?;
        stop_agent(agent, &log)?;
        rows.push((label.to_string(), emu, ss));
    }
    rows.push((
        "bpftrace count (entry)".into(),
        bpftrace(&prog, "emu_fn", "emu", calls, reps)?,
        bpftrace(&prog, "ss_fn", "ss", calls, reps)?,
    ));

    println!("\nprobe sites chosen by afetm:\n{placement}");
    println!("{:<28} {:>14} {:>14}", "ns per call", "emu_fn (push)", "ss_fn (lea)");
    for (label, emu, ss) in &rows {
        println!("{label:<28} {emu:>14.1} {ss:>14.1}");
    }
    let get = |l: &str| rows.iter().find(|r| r.0.starts_with(l)).map(|r| (r.1, r.2)).unwrap_or((f64::NAN, f64::NAN));
    let (none_e, none_s) = get("no probe");
    let (cnt_e, _) = get("afetm count");
    let (ev_e, ev_s) = get("afetm event");
    let (_, bt_s) = get("bpftrace");
    let (bt_e, _) = get("bpftrace");
    let (cs_e, cs_s) = get("afetm callstack");
    let (cp_e, cp_s) = get("afetm callstack (copy)");
    println!("\nratios (same run):");
    println!(
        "  callstack / event, emu_fn                : {:.2} (target <= 1.5; stack copy {:.2})",
        (cs_e - none_e) / (ev_e - none_e),
        (cp_e - none_e) / (ev_e - none_e)
    );
    println!(
        "  callstack / event, ss_fn                 : {:.2} (stack copy {:.2})",
        (cs_s - none_s) / (ev_s - none_s),
        (cp_s - none_s) / (ev_s - none_s)
    );
    println!("  afetm event / bare emulated probe, emu_fn : {:.2} (target <= 1.5)", (ev_e - none_e) / (cnt_e - none_e));
    println!("  bpftrace / afetm event, ss_fn             : {:.1}x (target >= 8)", (bt_s - none_s) / (ev_s - none_s));
    println!("  bpftrace / afetm event, emu_fn            : {:.2}x", (bt_e - none_e) / (ev_e - none_e));

    // Throughput: agent on CPU 0, analyzer on CPU 1.
    for mut c in guard.0.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    guard.0.push(start_analyzer(&bin, &dir, listen, Some("1"))?);
    let plan = dir.join("event.json");
    let (agent, log) = start_agent(&bin, &plan, &server, &dir, Some("0"))?;
    let total = 2_000_000u64;
    let t0 = Instant::now();
    run(Command::new(&prog).args(["emu", &total.to_string()]).stdout(Stdio::null()))?;
    let mut last = (0u64, t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        sleep(Duration::from_millis(200));
        let n = analyzer_events(&bin, &server)?;
        if n > last.0 {
            last = (n, t0.elapsed());
        } else if n >= total || t0.elapsed() > last.1 + Duration::from_secs(3) {
            break;
        }
    }
    let log = stop_agent(agent, &log)?;
    let drops = log
        .lines()
        .find(|l| l.contains("reader finished"))
        .map(|l| l.split_whitespace().filter(|w| w.contains("drops=")).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!("\nend to end (agent on CPU 0, analyzer on CPU 1, target unpinned):");
    println!(
        "  {} of {total} events stored in {:.2} s: {:.0} events/s  ({drops})",
        last.0,
        last.1.as_secs_f64(),
        last.0 as f64 / last.1.as_secs_f64()
    );
    Ok(())
}

fn analyzer_counter(bin: &Path, server: &str, name: &str) -> Result<u64> {
    let out = Command::new(bin.join("afetm-analyzer")).args(["stats", "--server", server]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")).map(|v| v.trim_end_matches(',').parse::<u64>()))
        .with_context(|| format!("no {name} counter in analyzer stats"))?
        .context("bad counter")
}

fn testbed_bench(built: bool, netns: bool, duration: Duration) -> Result<()> {
    run(&mut cargo(&["build", "--release", "--workspace", "--bins"]))?;
    let bin = target_dir().join("release");
    let dir = target_dir().join("bench-testbed");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut cfg = testbed::Config::new(dir.join("run"));
    cfg.base_port = 19080;
    cfg.netns = netns;
    if built {
        cfg.binaries = testbed::build::binaries(&testbed::build::cache_dir())
            .context("source builds missing: run `cargo xtask testbed build`")?;
    }
    struct Down(testbed::Config);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = testbed::down(&self.0);
        }
    }
    let _down = Down(cfg.clone());
    testbed::up(&cfg)?;
    let mut l = testbed::load::LoadConfig::new(cfg.url());
    l.connections = 8;
    l.duration = duration;
    l.items = cfg.seed_items;
    let untraced = testbed::load::run(&l)?;

    let listen = "127.0.0.1:20082";
    let server = format!("http://{listen}");
    let mut guard = Guard(vec![start_analyzer(&bin, &dir, listen, None)?]);
    let b = &cfg.binaries;
    let sqlite = b
        .sqlite_lib_dir
        .clone()
        .map(|d| d.join("libsqlite3.so.0"))
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0".into());
    let targets: [(&str, PathBuf, &str); 4] = [
        (
            "redis",
            b.redis.clone(),
            r#"{"function":"call","mode":"event"},{"function":"processCommand","mode":"callstack"},{"function":"lookupKey","mode":"event"},{"function":"addReply","mode":"event"}"#,
        ),
        (
            "nginx",
            b.nginx.clone(),
            r#"{"function":"ngx_http_handler","mode":"callstack"},{"function":"ngx_http_core_run_phases","mode":"event"},{"function":"ngx_http_upstream_init","mode":"event"}"#,
        ),
        (
            "httpd",
            b.apache2.clone(),
            r#"{"function":"ap_process_request","mode":"callstack"},{"function":"ap_invoke_handler","mode":"event"},{"function":"ap_die","mode":"event"}"#,
        ),
        (
            "sqlite",
            sqlite,
            r#"{"function":"sqlite3_step","mode":"callstack"},{"function":"sqlite3_prepare_v2","mode":"event"},{"function":"sqlite3_finalize","mode":"event"}"#,
        ),
    ];
    // Agents are killed on any early return; the normal path drains them with SIGTERM below.
    struct Agents(Vec<(Child, PathBuf)>);
    impl Drop for Agents {
        fn drop(&mut self) {
            for (c, _) in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut agents = Agents(Vec::new());
    for (id, path, points) in &targets {
        let plan = dir.join(format!("{id}.json"));
        std::fs::write(&plan, format!(r#"{{"target":{{"path":"{}"}},"points":[{points}]}}"#, path.display()))?;
        agents.0.push(start_agent_as(&bin, &plan, &server, &dir, None, id)?);
    }
    let (e0, a0) = (analyzer_counter(&bin, &server, "events")?, analyzer_counter(&bin, &server, "afcts")?);
    let t0 = Instant::now();
    let traced = testbed::load::run(&l)?;
    sleep(Duration::from_millis(1500)); // last windows close (1 s windows, 1 s grace)
    let secs = t0.elapsed().as_secs_f64();
    let (e1, a1) = (analyzer_counter(&bin, &server, "events")?, analyzer_counter(&bin, &server, "afcts")?);
    let mut drops = Vec::new();
    for (child, log) in std::mem::take(&mut agents.0) {
        let log = stop_agent(child, &log)?;
        let d = log
            .lines()
            .find(|l| l.contains("reader finished"))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("kernel_drops=")).map(str::to_string))
            .unwrap_or_default();
        drops.push(d);
    }
    for mut c in guard.0.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let what = format!(
        "{} binaries{}",
        if built { "source-built" } else { "stock" },
        if netns { ", tiers in namespaces" } else { "" }
    );
    println!("\nNHSR-OSW, CRUD mix, 8 connections, {duration:?} closed loop ({what}):");
    for (label, r) in [("untraced", &untraced), ("traced", &traced)] {
        println!(
            "  {label:<9} {:>7.0} req/s  mean {:>6.0} us  p50 {:>6}  p90 {:>6}  p99 {:>7}  errors {}",
            r.throughput_rps, r.latency.mean_us, r.latency.p50_us, r.latency.p90_us, r.latency.p99_us, r.errors
        );
    }
    println!(
        "  traced / untraced: throughput {:.2}, mean latency {:.2}",
        traced.throughput_rps / untraced.throughput_rps,
        traced.latency.mean_us / untraced.latency.mean_us
    );
    println!(
        "  analyzer: {} events in {secs:.1} s = {:.0} events/s; {} AFCTs = {:.1} AFCTs/s (1 s windows); agents {}",
        e1 - e0,
        (e1 - e0) as f64 / secs,
        a1 - a0,
        (a1 - a0) as f64 / secs,
        drops.join(" ")
    );
    Ok(())
}

/// `bench select`: one MMAS selection on a redis-sized random instance (4,300 functions,
/// 40,000 blocks) at P = 10/30/50%, next to greedy set cover timed in the same run.
pub fn select_bench(functions: usize, blocks: usize) -> Result<()> {
    if cfg!(debug_assertions) {
        // Time optimized code: run this same bench from a release build of xtask.
        return run(cargo(&["run", "--quiet", "--release", "--package", "xtask"]).arg("--").args([
            "bench",
            "select",
            "--functions",
            &functions.to_string(),
            "--blocks",
            &blocks.to_string(),
        ]));
    }
    use afetm_selection::{Params, bound_for, greedy, mmas, random_instance};
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let inst = random_instance(blocks, functions, &mut rng);
    println!("instance: {functions} functions, {blocks} blocks; MMAS {:?}", Params::default());
    println!(
        "{:>4} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10} {:>9}",
        "P", "mmas ms", "greedy ms", "mmas cover", "greedy cov", "mmas fns", "greedy fns", "w/w_ub"
    );
    for p in [0.1, 0.3, 0.5] {
        let w_ub = bound_for(&inst, p);
        let t = Instant::now();
        let g = greedy(&inst, w_ub);
        let tg = t.elapsed();
        let t = Instant::now();
        let s = mmas(&inst, w_ub, &Params::default())?;
        let tm = t.elapsed();
        println!(
            "{:>3.0}% {:>10.1} {:>10.1} {:>11.2}% {:>11.2}% {:>10} {:>10} {:>9.3}",
            p * 100.0,
            tm.as_secs_f64() * 1e3,
            tg.as_secs_f64() * 1e3,
            100.0 * s.covered as f64 / blocks as f64,
            100.0 * g.covered as f64 / blocks as f64,
            s.functions.len(),
            g.functions.len(),
            s.weight / w_ub
        );
    }
    Ok(())
}
