//! Response-time growth (AFETM Table I) and what tracing costs, measured on the shop: each
//! condition (untraced, plans, full tracing) runs the shop's CRUD mix closed loop, in a rotated
//! order per repetition so drift hits every condition alike. Per run: the target tier's own mean
//! time per request (redis `INFO commandstats` usec per call, nginx `$request_time`, Apache
//! `%D`), the shop's end-to-end mean latency and rate, and for traced runs the agents' CPU
//! seconds, events, call-stack events and kernel drops, and the analyzer's CPU seconds.
//! Redis runs also get a redis-benchmark pass (SET/GET, 8 connections) on the tier alone.
//!
//! Shared by `cargo xtask eval` (Table I) and `cargo xtask bench rtgr`.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    Guard,
    bench::{analyzer_events, start_agent_with, stop_agent},
    demo_diagnosis::terminate,
    sample::Target,
};

/// One measured condition: a label and the plans traced at once (none = untraced).
#[derive(Clone, Debug)]
pub struct Condition {
    pub label: String,
    pub plans: Vec<PathBuf>,
    /// Agents copy the stack window instead of unwinding in the kernel (the pre-issue-12 agent).
    pub stack_copies: bool,
}

impl Condition {
    pub fn new(label: impl Into<String>, plans: Vec<PathBuf>) -> Condition {
        Condition { label: label.into(), plans, stack_copies: false }
    }
}

/// Every repetition of one condition (the eval report reads `target`, `condition`, `tier_us`,
/// `e2e_ms`; the bench the rest).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub target: String,
    pub condition: String,
    pub tier_us: Vec<f64>,
    pub e2e_ms: Vec<f64>,
    pub rps: Vec<f64>,
    /// redis-benchmark mean latency, ms (redis only).
    pub bench_ms: Vec<f64>,
    pub seconds: Vec<f64>,
    pub agent_cpu_s: Vec<f64>,
    pub analyzer_cpu_s: Vec<f64>,
    pub events: Vec<u64>,
    pub stack_events: Vec<u64>,
    pub kernel_unwound: Vec<u64>,
    pub kernel_drops: Vec<u64>,
    /// Events the analyzer stored while the shop's load ran (warm-up included), and the
    /// shop's requests in that time: events per request served, without the redis-benchmark
    /// pass that follows.
    pub load_events: Vec<u64>,
    pub load_requests: Vec<f64>,
    /// The agents' own account (their "reader finished" line), ms per run: reader thread time
    /// draining the ring and building events, of which unwinding stack copies; cutting
    /// batches; the reader thread's CPU; the whole agent process's CPU.
    pub drain_ms: Vec<u64>,
    pub unwind_ms: Vec<u64>,
    pub cut_ms: Vec<u64>,
    pub reader_cpu_ms: Vec<u64>,
    pub process_cpu_ms: Vec<u64>,
    pub demotions: Vec<u64>,
}

/// What [`measure`] needs besides the conditions.
pub struct Setup<'a> {
    pub cfg: &'a testbed::Config,
    pub bin: &'a Path,
    pub dir: &'a Path,
    /// The tier whose own time is measured (None: end to end only).
    pub tier: Option<Target>,
    pub listen: &'a str,
    pub reps: usize,
    pub load_for: Duration,
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz.max(1.0))
}

/// A `name=value` counter from an agent's final "reader finished" log line.
pub fn reader_counter(log: &str, name: &str) -> u64 {
    log.lines()
        .rfind(|l| l.contains("reader finished"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))?.parse().ok()))
        .unwrap_or(0)
}

/// Runs every condition `reps` times in rotated order.
pub fn measure(s: &Setup, target_name: &str, conds: &[Condition]) -> Result<Vec<Row>> {
    if s.tier == Some(Target::Redis) {
        restart_redis(s.cfg)?;
    }
    let db = s.dir.join("rtgr.sqlite");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let analyzer = Command::new(s.bin.join("afetm-analyzer"))
        .args(["serve", "--listen", s.listen, "--window", "1s", "--db"])
        .arg(&db)
        .stderr(std::fs::File::create(s.dir.join("rtgr.analyzer.log"))?)
        .spawn()
        .context("starting afetm-analyzer")?;
    let analyzer_pid = analyzer.id();
    let mut guard = Guard(vec![analyzer]);
    sleep(Duration::from_millis(700));
    let server = format!("http://{}", s.listen);
    let mut rows: Vec<Row> = conds
        .iter()
        .map(|c| Row { target: target_name.to_string(), condition: c.label.clone(), ..Row::default() })
        .collect();
    for rep in 0..s.reps {
        for k in 0..conds.len() {
            let i = (k + rep) % conds.len();
            one_run(s, &server, analyzer_pid, rep, i, &conds[i], &mut rows[i])?;
        }
    }
    terminate(&mut guard.0[0]);
    Ok(rows)
}

fn one_run(
    s: &Setup,
    server: &str,
    analyzer_pid: u32,
    rep: usize,
    i: usize,
    c: &Condition,
    row: &mut Row,
) -> Result<()> {
    let mut agents = Vec::new();
    for (k, plan) in c.plans.iter().enumerate() {
        let id = format!("rtgr-{rep}-{i}-{k}");
        let extra: &[&str] = if c.stack_copies { &crate::bench::STACK_COPIES } else { &[] };
        agents.push(start_agent_with(s.bin, plan, server, s.dir, None, &id, extra)?);
    }
    if s.tier == Some(Target::Redis) {
        redis_command(s.cfg, "CONFIG RESETSTAT")?;
    }
    let analyzer_cpu0 = cpu_seconds(analyzer_pid).unwrap_or(0.0);
    let logs_at = testbed::logs::log_sizes(&s.cfg.logs_dir());
    let traced = !c.plans.is_empty();
    let stored = |bin: &Path| if traced { analyzer_events(bin, server).unwrap_or(0) } else { 0 };
    let events0 = stored(s.bin);
    let t = Instant::now();
    let mut l = testbed::load::LoadConfig::new(s.cfg.url());
    l.items = s.cfg.seed_items;
    l.duration = s.load_for;
    l.warmup = Duration::from_secs(1);
    let report = testbed::load::run(&l)?;
    let load_secs = t.elapsed().as_secs_f64();
    if traced {
        sleep(Duration::from_millis(400)); // the agent's last batches of the load
    }
    let load_events = stored(s.bin).saturating_sub(events0);
    let own = match s.tier {
        Some(Target::Redis) => Some(redis_usec_per_call(&redis_command(s.cfg, "INFO commandstats")?)),
        Some(Target::Nginx) => access_log_mean_us(&s.cfg.logs_dir(), &logs_at, "nginx-access.log", 1e6),
        Some(Target::Httpd) => access_log_mean_us(&s.cfg.logs_dir(), &logs_at, "-access.log", 1.0),
        // The time the PHP app spends in its queries is not logged.
        Some(Target::Sqlite) | None => None,
    };
    let bench = if s.tier == Some(Target::Redis) { redis_benchmark(s.cfg).ok() } else { None };
    let seconds = t.elapsed().as_secs_f64();
    let (mut cpu, mut events, mut stacks, mut unwound, mut drops) = (0.0, 0, 0, 0, 0);
    let mut stages = [0u64; 6];
    for (child, log) in agents {
        let proc_cpu = cpu_seconds(child.id()).unwrap_or(0.0);
        let text = stop_agent(child, &log)?;
        events += reader_counter(&text, "events");
        stacks += reader_counter(&text, "stack_events");
        unwound += reader_counter(&text, "kernel_unwound");
        drops += reader_counter(&text, "kernel_drops");
        for (k, name) in
            ["drain_ms", "unwind_ms", "cut_ms", "reader_cpu_ms", "process_cpu_ms", "demotions"].iter().enumerate()
        {
            stages[k] += reader_counter(&text, name);
        }
        // The agent's own figure includes its final drain; /proc is the fallback.
        let logged = reader_counter(&text, "process_cpu_ms");
        cpu += if logged > 0 { logged as f64 / 1000.0 } else { proc_cpu };
    }
    let analyzer_cpu = cpu_seconds(analyzer_pid).unwrap_or(0.0) - analyzer_cpu0;
    row.tier_us.extend(own);
    row.e2e_ms.push(report.latency.mean_us / 1000.0);
    row.rps.push(report.throughput_rps);
    row.bench_ms.extend(bench);
    row.seconds.push(seconds);
    if !c.plans.is_empty() {
        row.agent_cpu_s.push(cpu);
        row.analyzer_cpu_s.push(analyzer_cpu);
        row.events.push(events);
        row.stack_events.push(stacks);
        row.kernel_unwound.push(unwound);
        row.kernel_drops.push(drops);
        row.load_events.push(load_events);
        row.load_requests.push(report.throughput_rps * load_secs);
        row.drain_ms.push(stages[0]);
        row.unwind_ms.push(stages[1]);
        row.cut_ms.push(stages[2]);
        row.reader_cpu_ms.push(stages[3]);
        row.process_cpu_ms.push(stages[4]);
        row.demotions.push(stages[5]);
    }
    println!(
        "rtgr rep {} {}: {:.0} req/s, mean {:.2} ms, {} errors{}{}{}",
        rep + 1,
        c.label,
        report.throughput_rps,
        report.latency.mean_us / 1000.0,
        report.errors,
        row.tier_us.last().filter(|_| own.is_some()).map_or(String::new(), |u| format!(", tier {u:.2} us")),
        bench.map_or(String::new(), |b| format!(", redis-benchmark {b:.3} ms")),
        if c.plans.is_empty() {
            String::new()
        } else {
            format!(", {events} events ({stacks} stacks, {drops} dropped), agent {cpu:.2} s CPU")
        }
    );
    Ok(())
}

pub fn restart_redis(cfg: &testbed::Config) -> Result<()> {
    testbed::stop_tier(cfg, testbed::Tier::Redis)?;
    testbed::start_tier(cfg, testbed::Tier::Redis, None)?;
    Ok(())
}

/// redis-benchmark against the shop's redis (SET and GET, 8 connections): the mean latency in
/// ms over both.
fn redis_benchmark(cfg: &testbed::Config) -> Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-h", &cfg.tier_host(3), "-p", &cfg.redis_port().to_string()])
        .args(["-c", "8", "-n", "20000", "-t", "set,get", "--csv"])
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms",...
    let avgs: Vec<f64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(2).and_then(|v| v.trim_matches('"').parse::<f64>().ok()))
        .collect();
    anyhow::ensure!(!avgs.is_empty(), "no redis-benchmark figures in: {text}");
    Ok(avgs.iter().sum::<f64>() / avgs.len() as f64)
}

/// Sends one inline command to the shop's redis and returns its reply.
pub fn redis_command(cfg: &testbed::Config, command: &str) -> Result<String> {
    let mut s = TcpStream::connect((cfg.tier_host(3).as_str(), cfg.redis_port())).context("connecting to redis")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{command}\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        // A status line, or a bulk string whose announced length has arrived.
        let complete = match text.strip_prefix('$') {
            Some(rest) => rest
                .split_once("\r\n")
                .and_then(|(len, body)| len.parse::<usize>().ok().map(|l| body.len() >= l))
                .unwrap_or(false),
            None => text.ends_with("\r\n"),
        };
        if n == 0 || complete {
            return Ok(text.into_owned());
        }
    }
}

/// Time per command over every command redis ran (INFO commandstats: calls=N,usec=U,...).
pub fn redis_usec_per_call(info: &str) -> f64 {
    let (mut calls, mut usec) = (0u64, 0u64);
    for line in info.lines().filter(|l| l.starts_with("cmdstat_")) {
        for kv in line.split_once(':').map_or("", |x| x.1).split(',') {
            match kv.split_once('=') {
                Some(("calls", v)) => calls += v.parse::<u64>().unwrap_or(0),
                Some(("usec", v)) => usec += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    if calls == 0 { 0.0 } else { usec as f64 / calls as f64 }
}

/// Mean of the last field of the access-log lines written since `before` (nginx: `$request_time`
/// in s, Apache: `%D` in us; `scale` turns it into us), over the files whose name ends with
/// `suffix`; warm-up requests included. `None` without any line.
fn access_log_mean_us(dir: &Path, before: &HashMap<PathBuf, u64>, suffix: &str, scale: f64) -> Option<f64> {
    use std::io::{Seek, SeekFrom};
    let (mut sum, mut n) = (0.0, 0u64);
    for (path, len) in testbed::logs::log_sizes(dir) {
        let apache_or_nginx = path
            .file_name()
            .and_then(|f| f.to_str())
            .is_some_and(|f| f.ends_with(suffix) && (suffix != "-access.log" || f.starts_with("apache")));
        if !apache_or_nginx {
            continue;
        }
        let from = before.get(&path).copied().unwrap_or(0).min(len);
        let Ok(mut f) = std::fs::File::open(&path) else { continue };
        let mut text = String::new();
        if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_string(&mut text).is_err() {
            continue;
        }
        for v in text.lines().filter_map(|l| l.split_whitespace().nth_back(if suffix == "-access.log" { 0 } else { 1 }))
        {
            if let Ok(x) = v.parse::<f64>() {
                sum += x * scale;
                n += 1;
            }
        }
    }
    (n > 0).then(|| sum / n as f64)
}

/// A plan tracing every function of `file` in event mode (`<dir>/plan-full.json`).
pub fn full_plan(dir: &Path, file: &Path) -> Result<PathBuf> {
    let full = dir.join("plan-full.json");
    std::fs::write(
        &full,
        serde_json::json!({"target": {"path": file}, "points": [{"function": "*", "mode": "event"}]}).to_string(),
    )?;
    Ok(full)
}
